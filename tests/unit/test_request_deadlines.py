import pytest

from ipaas.gateway.request_deadlines import BODY_TIMEOUT, HEAD_TIMEOUT, body_timeout, head_timeout


def test_deadlines_default_and_read_seconds() -> None:
    assert (head_timeout({}), body_timeout({"IPAAS_HTTP_BODY_TIMEOUT": " "})) == (HEAD_TIMEOUT, BODY_TIMEOUT)
    assert (head_timeout({"IPAAS_HTTP_HEAD_TIMEOUT": "2.5"}), body_timeout({"IPAAS_HTTP_BODY_TIMEOUT": "60"})) == (2.5, 60.0)


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "ten", "inf s"])
def test_a_deadline_that_is_not_a_positive_number_stops_start_up(raw: str) -> None:
    with pytest.raises(SystemExit, match="IPAAS_HTTP_HEAD_TIMEOUT must be"):
        head_timeout({"IPAAS_HTTP_HEAD_TIMEOUT": raw})
