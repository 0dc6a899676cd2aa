"""One subpackage per published method."""
