from tests.fakes.plivo_rest import fake_plivo  # noqa: F401  (fixture)
