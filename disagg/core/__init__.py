"""The planning core: topology labels and placement, the settings and
inventory schema, the deployment plan and every file it puts on a host
(units, configs, firewall rules, certificates). Pure: no pyinfra, no SSH,
so `disagg render` and the tests need no host."""
