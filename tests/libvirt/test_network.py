"""tests/network through libvirt: NICs on taps of the container's namespace plugged before the
guest runs, hot-plugged and unplugged later, all over qemu-monitor-command (tap fds by getfd)."""

from __future__ import annotations

from tests.network.test_hotplug import (  # noqa: F401 (collected here again)
    test_a_second_network_is_hot_plugged_and_unplugged,
)
from tests.network.test_mirror import (  # noqa: F401
    test_container_fetches_a_page_from_a_peer_namespace,
    test_ipv6_routes_and_mtu_9000_end_to_end,
)
from tests.network.test_sandboxes import (  # noqa: F401
    test_a_killed_supervisor_does_not_break_the_namespace,
)
