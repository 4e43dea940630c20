"""The fidelity acceptance harness: randomized workloads, tree snapshots, event replay and the checks of issue 3."""
