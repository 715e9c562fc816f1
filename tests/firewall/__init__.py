"""Tests of the redirect: ruleset rendering, the root helper, the client."""
