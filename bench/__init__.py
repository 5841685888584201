"""The benchmark of the gateway (`make bench`): see bench/README.md."""
