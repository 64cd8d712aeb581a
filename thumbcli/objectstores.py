"""The object stores a bucket URL may name (`s3://`, `az://`): each one's obstore client and the environment it reads.

One table, so that every other module asks about "a bucket URL" and never about a scheme; that
question (`is_bucket_url`) is answered here, so that a run on local folders never imports `bucket`.
Nothing here imports obstore (`bucket` is its only importer) or returns a secret to be shown:
the settings read here go to the store's client and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

#: The setting (seconds) of how long a request may wait for the store's next byte before it is retried.
TIMEOUT_SETTING = "THUMBCLI_S3_TIMEOUT"


@dataclass(frozen=True, slots=True)
class StoreKind:
    """One kind of object store: its URL scheme, its obstore client and where its settings come from."""

    #: The URL scheme, with its '://'.
    scheme: str
    #: What its top-level namespace is called, in messages ("bucket", "container").
    holder: str
    #: The obstore.store class of its client; empty: the scheme is known and refused (`refusal` says why).
    client: str
    #: The folder under $XDG_STATE_HOME/thumbcli holding the records of its destinations.
    state_folder: str
    #: Settings (object_store's names) the client's own reading of the environment leaves out, and the
    #: endpoint in use ('' for the store's default, over https).
    settings: Callable[[], tuple[dict[str, str], str]]
    refusal: str = ""


#: The settings of a profile read from the AWS files, by their name there and object_store's.
_PROFILE_SETTINGS = (
    ("aws_access_key_id", "access_key_id"),
    ("aws_secret_access_key", "secret_access_key"),
    ("aws_session_token", "session_token"),
    ("region", "region"),
    ("endpoint_url", "endpoint"),
)


def aws_profile_settings() -> dict[str, str]:
    """Keys, region and endpoint of AWS_PROFILE from ~/.aws/credentials and ~/.aws/config (object_store's names).

    object_store reads the environment only; profiles are how many people keep their keys.
    What the environment sets wins.
    """
    import configparser  # only a run that talks to S3 reads these files

    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    if not profile and "AWS_ACCESS_KEY_ID" in os.environ:
        return {}
    profile = profile or "default"
    home = os.path.expanduser("~/.aws")
    config_section = profile if profile == "default" else f"profile {profile}"
    found: dict[str, str] = {}
    for path, section in (
        (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", f"{home}/credentials"), profile),
        (os.environ.get("AWS_CONFIG_FILE", f"{home}/config"), config_section),
    ):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        if parser.has_section(section):
            for name, key in _PROFILE_SETTINGS:
                if parser.has_option(section, name) and not os.environ.get(f"AWS_{key.upper()}"):
                    found.setdefault(key, parser.get(section, name))
    return found


def _s3_settings() -> tuple[dict[str, str], str]:
    """The AWS profile's settings, and AWS_ENDPOINT_URL(_S3) or the profile's endpoint."""
    config = aws_profile_settings()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return config, endpoint or config.get("endpoint", "")


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _azure_settings() -> tuple[dict[str, str], str]:
    """Nothing beyond what object_store reads itself (AZURE_STORAGE_ACCOUNT_NAME, ..._ACCOUNT_KEY,
    ..._SAS_TOKEN, ..._ENDPOINT, ..._USE_EMULATOR), and the endpoint those name.

    With AZURE_STORAGE_USE_EMULATOR, object_store talks to Azurite at AZURITE_BLOB_STORAGE_URL
    (default http://127.0.0.1:10000) with its well-known development account.
    """
    if _is_true(os.environ.get("AZURE_STORAGE_USE_EMULATOR")):
        return {}, os.environ.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000"
    return {}, os.environ.get("AZURE_STORAGE_ENDPOINT") or os.environ.get("AZURE_ENDPOINT") or ""


def _no_settings() -> tuple[dict[str, str], str]:
    return {}, ""


KINDS = (
    StoreKind("s3://", "bucket", "S3Store", "buckets", _s3_settings),
    StoreKind("az://", "container", "AzureStore", "azure-containers", _azure_settings),
    StoreKind(
        "gs://",
        "bucket",
        "",
        "",
        _no_settings,
        refusal="Google Cloud Storage is not supported yet (s3:// and az:// are)",
    ),
)
#: Every scheme a bucket URL may start with.
SCHEMES = tuple(kind.scheme for kind in KINDS)


def is_bucket_url(path: str) -> bool:
    """Whether `path` names a place in object storage rather than on a filesystem."""
    return path.startswith(SCHEMES)


def kind_of(url: str) -> StoreKind | None:
    """The kind of store `url` names, or None for a path on a filesystem."""
    return next((kind for kind in KINDS if url.startswith(kind.scheme)), None)
