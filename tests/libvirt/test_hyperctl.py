"""tests/hyperctl/test_run.py through libvirt."""

from __future__ import annotations

from tests.hyperctl.test_run import (  # noqa: F401 (collected here again)
    test_a_command_that_cannot_run_exits_127_or_126_as_with_podman,
    test_killed_foreground_run_leaves_an_exited_container_that_rm_cleans,
    test_loaded_image_runs_its_own_command_and_rmi,
    test_read_only_root_and_entrypoint,
    test_terminal_and_stdin,
    test_timeout_kills_the_sandbox,
    test_writable_layer_is_per_container_and_rm_leaves_the_image_untouched,
)
