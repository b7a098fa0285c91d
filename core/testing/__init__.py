"""Testing kit for connector authors: `ipaas.testing.contract.ConnectorContract`."""
