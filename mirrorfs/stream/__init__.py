"""The event stream: the subscription socket, filters, Redis publishing and collection, metrics, status, and
how an event is rendered as a line (docs/ARCHITECTURE.md "The stream"). Never imports mirrorfs.view."""
