"""Pure logic that the served path relies on: stop-string hold-back, config parsing, CPU topology."""

from __future__ import annotations

import pytest

from infersnap.config import KEYS, ConfigError, parse_value
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.workers.text import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], bool]:
    sent = []
    for piece in pieces:
        text, hit = stream.push(piece)
        sent.append(text)
        if hit:
            return sent, True
    sent.append(stream.flush())
    return sent, False


def test_stop_string_split_across_tokens_is_never_sent():
    sent, hit = feed(TextStream(["END"]), [b"abc E", b"N", b"D more"])
    assert hit and "".join(sent) == "abc "
    assert all("E" not in s for s in sent)


def test_held_text_is_released_when_it_stops_matching():
    sent, hit = feed(TextStream(["END"]), [b"xE", b"Nz"])
    assert not hit and sent == ["x", "ENz", ""]


def test_split_utf8_characters_are_joined():
    euro = "€".encode()
    sent, _ = feed(TextStream([]), [euro[:1], euro[1:], b"!"])
    assert "".join(sent) == "€!" and sent[0] == ""


def test_config_values_are_typed_and_bounded():
    assert parse_value(KEYS["http.port"], "9090") == 9090
    assert parse_value(KEYS["verbose"], "yes") is True
    with pytest.raises(ConfigError):
        parse_value(KEYS["http.port"], "0")


def test_physical_cores_skip_hyperthread_siblings(tmp_path):
    for cpu, core in [(0, 0), (1, 1), (2, 0), (3, 1)]:
        topology = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text(f"{core}\n")
        (topology / "physical_package_id").write_text("0\n")
    assert physical_core_cpus(str(tmp_path), allowed={0, 1, 2, 3}) == [0, 1]
    assert physical_core_cpus(str(tmp_path), allowed={2, 3}) == [2, 3]
