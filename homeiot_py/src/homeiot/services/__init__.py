"""Services: wire the core and the adapters into the publisher, the gateway and the archiver."""
