"""ozon-cancel-risk serving: the REST scoring service (imports the shared contract from training)."""
