"""subjectAltName entries for the broker certificate, each name or address in the right kind.

``mqtt_pki_subject_alt_names(names, ips)`` returns ``["DNS:…", "IP:…"]``. An IP address given
among the names (the seed lets MQTT_HOST be the server's address, and the inventory derives the
names from it) becomes an ``IP:`` entry: TLS clients match an address only against IP SANs, so a
``DNS:192.168.1.10`` entry would make every client connecting by IP fail verification.
Entries that are neither a host name nor an address are refused with a message naming them.
"""

from __future__ import annotations

import ipaddress
import re

from ansible.errors import AnsibleFilterError

# RFC 1123 labels; a leading "*." wildcard is allowed for completeness.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$")


def _address(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        return None


def mqtt_pki_subject_alt_names(names: list[str], ips: list[str]) -> list[str]:
    """The certificate's SAN list: host names as ``DNS:``, addresses (from either list) as ``IP:``."""
    if not isinstance(names, list) or not isinstance(ips, list):
        raise AnsibleFilterError("mqtt_pki_server_names and mqtt_pki_server_ips must be lists")
    dns: list[str] = []
    addresses: list[str] = []
    for name in names:
        text = str(name).strip()
        address = _address(text)
        if address is not None:
            addresses.append(address)
        elif _HOSTNAME.match(text) and not re.fullmatch(r"[0-9.]+", text):
            dns.append(text.rstrip(".").lower())
        else:
            raise AnsibleFilterError(
                f"mqtt_pki_server_names: {text!r} is neither a host name nor an IP address")
    for ip in ips:
        address = _address(str(ip).strip())
        if address is None:
            raise AnsibleFilterError(f"mqtt_pki_server_ips: {ip!r} is not an IP address")
        addresses.append(address)
    entries = [f"DNS:{n}" for n in dict.fromkeys(dns)] + [f"IP:{a}" for a in dict.fromkeys(addresses)]
    if not entries:
        raise AnsibleFilterError(
            "the broker certificate needs at least one name or address: set mqtt_pki_server_names "
            "and/or mqtt_pki_server_ips")
    return entries


def mqtt_pki_is_address(value: str) -> bool:
    """Whether ``value`` is an IP address (v4 or v6), not a host name."""
    return _address(str(value).strip()) is not None


class FilterModule:
    def filters(self) -> dict[str, object]:
        return {
            "mqtt_pki_subject_alt_names": mqtt_pki_subject_alt_names,
            "mqtt_pki_is_address": mqtt_pki_is_address,
        }
