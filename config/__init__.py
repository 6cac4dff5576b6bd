"""The shipped configuration as a package: installed as `softrelay_config` (see
pyproject.toml [tool.setuptools.package-dir]), so an install outside the checkout finds
the sample `softrelay.toml` and the `policy/` profiles through importlib.resources."""
