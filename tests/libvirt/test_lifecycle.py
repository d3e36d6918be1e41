"""tests/cli/test_lifecycle.py through libvirt: create/start/state/delete with a stand-in, exec,
ps, pause/resume (libvirt's suspend/resume), update, stats (test_domains.py has `runv run`'s
output, pause/resume seen in `virsh list`). Left out here for CI time (they pass with libvirt
too; nothing in them depends on who runs QEMU): the foreground run's exit codes, signals, the
events stream, bad bundles (refused before a VM starts)."""

from __future__ import annotations

from tests.cli.test_lifecycle import (  # noqa: F401 (collected here again)
    test_create_start_state_delete_with_stand_in,
    test_exec_ps_pause_update_stats,
)
