"""The local lab: systemd test hosts in network namespaces, the tiny model
the CPU engine serves, a counting load client and smoke requests: what the
local stack and the tests use."""
