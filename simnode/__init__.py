"""Simulated node pieces for tests and the demo: a loopback kubelet, TLS material."""
