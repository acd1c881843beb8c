"""podman 4.3 (CNI backend) as a real runtime for the tests: environment, image, product wiring."""
