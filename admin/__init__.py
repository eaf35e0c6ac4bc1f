"""The operators' command line (not deployed to Lambda): add, list, authorize, refresh and revoke connections."""
