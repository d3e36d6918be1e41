"""tests/integration/test_shim.py through libvirt: containerd's tasks and pods on the shim. Left
out here (they pass with libvirt too, and nothing in them depends on who runs QEMU): the OOM
event (test_lifecycle's OOM test covers the guest's side under libvirt) and the log URIs."""

from __future__ import annotations

from tests.integration.test_shim import (  # noqa: F401 (collected here again)
    test_exec_pause_resume_metrics_kill,
    test_killed_pod_shim_is_cleaned_up,
    test_killed_shim_is_cleaned_up,
    test_pod_container_without_its_sandbox_fails,
    test_pod_shares_one_vm_and_localhost,
    test_run_rm_output_exit_code_and_events,
    test_stdin_reaches_the_process,
    test_terminal_size_reaches_the_process,
    test_update_through_the_shim,
)
