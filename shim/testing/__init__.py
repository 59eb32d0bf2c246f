"""pyrunc's integration harness as a product: the differential conformance scenarios, runnable against
any containerd shim with containerd's Go shim as the oracle.

- ``stack``: a throwaway containerd (own root, state, socket), busybox rootfs and image builders;
- ``helpers``: differential runs (``run_each``, ``same``), task status and event helpers;
- ``plugin``: the pytest plugin (``-p shim.testing.plugin``: ``--runtime``, ``--oracle``, fixtures);
- ``conformance``: the scenarios.

Imports nothing here: the shim binary never needs this package, and ``shim.testing.plugin`` must
register assertion rewriting before ``helpers`` and ``conformance`` are imported.
"""
