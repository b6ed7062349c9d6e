"""The REST scoring service; it imports only the shared contract from ``training``."""
