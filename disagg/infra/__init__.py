"""pyinfra on the controller: facts read from hosts, the inventory loader,
preflight, the deploy launcher, and what asks deployed hosts (status,
fingerprint); also the controller's own fetches (the Hub, the wheelhouse).
The operations and deploys themselves are in disagg.roles and disagg.deploys."""
