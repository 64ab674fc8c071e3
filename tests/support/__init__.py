"""Helpers shared by the tests: fakes, a worker stack, fake S3 servers, waits, test images."""
