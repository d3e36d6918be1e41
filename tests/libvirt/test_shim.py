"""tests/integration/test_shim.py through libvirt: containerd's tasks and pods on the shim. Left
out here for CI time (they pass with libvirt too, and nothing in them depends on who runs
QEMU): stdin, the terminal size, update, the OOM event, the log URIs, a pod container without
its sandbox, a killed pod shim."""

from __future__ import annotations

from tests.integration.test_shim import (  # noqa: F401 (collected here again)
    test_exec_pause_resume_metrics_kill,
    test_killed_shim_is_cleaned_up,
    test_pod_shares_one_vm_and_localhost,
    test_run_rm_output_exit_code_and_events,
)
