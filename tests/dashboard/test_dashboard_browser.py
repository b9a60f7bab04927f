import pytest

pytestmark = pytest.mark.browser


def test_smoke(dashboard):
    dashboard.login()
    dashboard.screenshot("overview")
    dashboard.open_model("yard/3")
    dashboard.screenshot("model-view")
    print(dashboard.shots)
