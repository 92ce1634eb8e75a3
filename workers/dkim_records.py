"""``mailpool dkim-records``: the DNS records to publish for a --dkim-keys table.

One TXT record per key, at ``SELECTOR._domainkey.DOMAIN``, in zone-file form (long values
split into strings of at most 255 octets, as DNS requires); a ``*`` line's record is shown
for ``--domain`` (every From domain it signs for needs it, or a CNAME to one copy).  Reads
the key files only: no Redis.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

from workers.codec.signing import ANY_DOMAIN, KeyTable, host_name
from workers.config import CommonConfig, ConfigError, load_key_table, option

TXT_STRING = 255  # octets per character-string (RFC 1035 section 3.3.14)


@dataclass
class DkimRecordsConfig(CommonConfig):
    """``mailpool dkim-records``: print the DKIM TXT records of a key table."""

    dkim_keys: str | None = option(None, "the DKIM key table, as given to deliver")
    domain: str = option("", "the From domain to show a '*' line's record for")

    def validate(self) -> None:
        super().validate()
        if not self.dkim_keys:
            raise ConfigError("--dkim-keys is required (the key table to print records for)")
        if self.domain:
            ascii_domain = host_name(self.domain)
            if ascii_domain is None:
                raise ConfigError(f"--domain {self.domain!r} is not a domain name")
            self.domain = ascii_domain
        if ANY_DOMAIN in self.table.by_domain and not self.domain:
            raise ConfigError("the table has a '*' line: give --domain, a From domain it signs for")

    @functools.cached_property
    def table(self) -> KeyTable:
        """The key table, read once (ConfigError naming a bad line or key)."""
        return load_key_table(self.dkim_keys or "")


def zone_line(name: str, text: str) -> str:
    """``name. IN TXT ( "..." "..." )``: ``text`` in strings of at most 255 octets."""
    parts = [text[i : i + TXT_STRING] for i in range(0, len(text), TXT_STRING)]
    quoted = " ".join(f'"{part}"' for part in parts)
    return f"{name}. IN TXT ( {quoted} )"


async def main(config: DkimRecordsConfig) -> int:
    for domain, keys in config.table.by_domain.items():
        shown = config.domain if domain == ANY_DOMAIN else domain
        for key in keys:
            note = f"; {key.algorithm}, {key.source}"
            if domain == ANY_DOMAIN:
                note += f" ('*': publish it under every From domain it signs, here {shown})"
            sys.stdout.write(note + "\n")
            sys.stdout.write(zone_line(f"{key.selector}._domainkey.{shown}", key.public_record()))
            sys.stdout.write("\n")
    return 0
