"""Replicas of running VMs: ready-to-boot copies on another disk or machine, with restore points.

`layout` is the replica directory (its record, qcow2 chains, retention); `images` the qemu-img
operations on them. See docs/replication.md.
"""
