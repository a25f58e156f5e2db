"""Test support: real servers on private loopback ports, named doubles, time units."""
