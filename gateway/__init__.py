"""simple-ipaas: the REST gateway."""
