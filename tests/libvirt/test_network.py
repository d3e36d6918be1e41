"""tests/network through libvirt: a NIC on a tap of the container's namespace plugged before the
guest runs, a second one hot-plugged and unplugged later, all over qemu-monitor-command (tap fds
by getfd). Left out for CI time: IPv6/MTU 9000, the peer fetch and the killed supervisor's
namespace (the same NIC path; the killed supervisor is test_domains.py's)."""

from __future__ import annotations

from tests.network.test_hotplug import (  # noqa: F401 (collected here again)
    test_a_second_network_is_hot_plugged_and_unplugged,
)
