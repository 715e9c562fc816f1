"""End-to-end tests of the relay with real components (the lab: netns, nft, Squid, Dante, curl)."""
