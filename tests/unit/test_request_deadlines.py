import pytest

from ipaas.gateway.request_deadlines import BODY_TIMEOUT, HEAD_TIMEOUT, MAX_CONNECTIONS, body_timeout, head_timeout, max_connections


def test_deadlines_default_and_read_seconds() -> None:
    assert (head_timeout({}), body_timeout({"IPAAS_HTTP_BODY_TIMEOUT": " "})) == (HEAD_TIMEOUT, BODY_TIMEOUT)
    assert (head_timeout({"IPAAS_HTTP_HEAD_TIMEOUT": "2.5"}), body_timeout({"IPAAS_HTTP_BODY_TIMEOUT": "60"})) == (2.5, 60.0)


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "ten", "inf s"])
def test_a_deadline_that_is_not_a_positive_number_stops_start_up(raw: str) -> None:
    with pytest.raises(SystemExit, match="IPAAS_HTTP_HEAD_TIMEOUT must be"):
        head_timeout({"IPAAS_HTTP_HEAD_TIMEOUT": raw})


def test_the_connection_limit_defaults_and_refuses_zero() -> None:
    assert (max_connections({}), max_connections({"IPAAS_HTTP_MAX_CONNECTIONS": "50"})) == (MAX_CONNECTIONS, 50)
    with pytest.raises(SystemExit, match="IPAAS_HTTP_MAX_CONNECTIONS must be"):
        max_connections({"IPAAS_HTTP_MAX_CONNECTIONS": "0"})
