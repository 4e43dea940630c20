"""The event stream: the subscription socket, filters, Redis publishing and collection, metrics, status, and
how an event is rendered as a line (docs/ARCHITECTURE.md "Layout"). Never imports mirrorfs.view."""
