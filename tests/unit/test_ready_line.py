"""The ready line (services/contracts/ready_line.py): what a launcher reads back is what a
service printed."""
from services.contracts.ready_line import READY_LINE, ready_fields, ready_line


def test_a_ready_line_round_trips_its_ports_and_extra_fields():
    line = ready_line("ranker", 50051, 9090, workers=2, worker_metrics_ports="9090,9091")
    match = READY_LINE.search("log noise before " + line)
    assert match.groups() == ("ranker", "50051", "9090")
    assert ready_fields(line) == {"workers": "2", "worker_metrics_ports": "9090,9091"}


def test_a_plain_ready_line_has_no_extra_fields_and_no_metrics_port():
    line = ready_line("features", 1234, None)
    assert READY_LINE.search(line).group(3) == "None"
    assert ready_fields(line) == {}
    assert ready_fields("not a ready line workers=3") == {}
