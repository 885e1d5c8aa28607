from pathlib import Path

import msgspec
import pytest

from spot.config import Settings, load_settings, settings_from_dict
from spot.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "spot.example.toml"


def test_example_config_loads_and_says_what_it_asks_for() -> None:
    settings = load_settings(EXAMPLE)

    assert settings.book.orderbook_levels == 15
    assert settings.book.data_type == "book_snapshot_15_100ms"
    assert [e.name for e in settings.exchanges] == ["binance", "coinbase"]


def test_defaults_need_no_file() -> None:
    settings = load_settings(None, {})

    assert settings.tardis.url == "ws://127.0.0.1:8001"
    assert settings.tardis.mode == "stream"
    assert settings.database.url == ""
    assert settings.queue.capacity > 0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "spot.toml"
    path.write_text('[database]\nurl = "postgresql://file/db"\n')

    settings = load_settings(
        path, {"SPOT_DATABASE_URL": "postgresql://env/db", "SPOT_TARDIS_URL": "ws://tm:9001"}
    )

    assert settings.database.url == "postgresql://env/db"
    assert settings.tardis.url == "ws://tm:9001"


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"queue": {"batchsize": 5}}, "unknown field `batchsize` - at `$.queue`"),
        ({"queue": {"batch_size": 0}}, "$.queue.batch_size"),
        ({"book": {"orderbook_levels": 0}}, "$.book.orderbook_levels"),
        ({"book": {"snapshot_interval": "100 ms"}}, "$.book.snapshot_interval"),
        ({"tardis": {"mode": "live"}}, "$.tardis.mode"),
        ({"tardis": {"mode": "replay"}}, "replay mode needs both `from` and `to`"),
        ({"tardis": {"url": "http://x"}}, "url must start with ws://"),
        ({"exchanges": [{"name": "binance", "symbols": []}]}, "$.exchanges[0].symbols"),
        ({"ticker_overrides": {"XBTUSD": "BTC-USD"}}, "ticker_overrides.XBTUSD"),
        (
            {"exchanges": [{"name": "a", "symbols": ["X"]}, {"name": "a", "symbols": ["Y"]}]},
            "exchange listed twice: a",
        ),
    ],
)
def test_invalid_settings_name_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_dict(raw)

    assert named in str(raised.value)


def test_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[queue\n")

    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_snapshot_interval_units() -> None:
    assert settings_from_dict({"book": {"snapshot_interval": "1s"}}).book.interval_ms == 1000
    assert settings_from_dict({"book": {"snapshot_interval": "0ms"}}).book.interval_ms == 0


def _keys(struct_type: type, prefix: str = "") -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(struct_type):
        annotation = field.type
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            keys |= _keys(annotation, f"{field.encode_name}.")
        else:
            keys.add(f"{prefix}{field.encode_name}")
    return keys


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    missing = [
        key
        for key in sorted(_keys(Settings))
        if key.split(".")[-1] + " =" not in text.replace("# ", "")
        and key not in {"exchanges", "ticker_overrides"}
    ]

    assert not missing, f"spot.example.toml does not mention {missing}"
