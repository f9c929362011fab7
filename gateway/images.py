"""Turn an OpenAI ``image_url.url`` into a decoded, validated RGB ``PIL.Image.Image``, safely.

Two sources are accepted: ``data:image/...;base64,`` URLs and ``http(s)://`` URLs. Fetching a URL
on a client's behalf is a classic SSRF vector, so every hop (the first and each redirect) is
resolved once, every resolved address is checked (loopback, private, link-local, metadata,
IPv4-mapped/6to4/Teredo/NAT64 forms, odd numeric spellings), and the connection goes to exactly
the address that was checked: the request URL is rewritten to that IP, with the original
``Host`` header and, for https, the original name as SNI and certificate name. That closes the
DNS-rebinding gap between "check" and "connect". Decoded images are bounded by bytes before
decoding and by pixels before the pixel data is decompressed (decompression bombs).

Every refusal is an ``InvalidRequest`` (400) with ``param="messages"``, as the contract requires.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from gateway.errors import InvalidRequest
from gateway.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DATA_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"})
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_INET_ATON_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*", re.ASCII)


def _refuse(message: str, code: str = "invalid_image_url") -> InvalidRequest:
    """One place that shapes refusals, so every one carries ``param="messages"``."""
    return InvalidRequest(message, param="messages", code=code)


@dataclass(frozen=True)
class ImageLimits:
    """The caps one image must fit; ``allow``: hosts or CIDR networks exempt from SSRF checks."""

    max_bytes: int
    max_pixels: int
    timeout_s: float
    max_redirects: int
    allow: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            timeout_s=settings.image_fetch_timeout_s,
            max_redirects=settings.image_fetch_max_redirects,
            allow=tuple(settings.image_fetch_allow),
        )


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse inet_aton spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) as resolvers do.

    Without this, a name like ``0x7f.1`` would look like a hostname to us while libc's resolver
    (and browsers) read it as 127.0.0.1. Returns None when the host is not all-numeric.
    """
    parts = host.lower().removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    numbers = [
        int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8 if p.startswith("0") else 10)
        for p in parts
    ]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise _refuse(f"image URL host {host!r} is not a valid IP address")
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host names literally (zone ids dropped), or None for a DNS name."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return _legacy_ipv4(host)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv6 transition form would actually reach, if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why an address must not be fetched from (e.g. "loopback"), or None when it is public."""
    embedded = _embedded_ipv4(address)
    if embedded is not None and (problem := address_problem(embedded)):
        return problem
    checks = [
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    ]
    return next((name for name, hit in checks if hit), None)


def decode_image(data: bytes, max_pixels: int, hint: str = "") -> Image.Image:
    """Decode bytes into an RGB image, checking dimensions before any pixel is decompressed.

    ``Image.open`` only reads the header, so a 10000x10000 single-colour PNG (a few KB) is
    refused here before it can allocate 100+ MB. Transparency is flattened onto white, as the
    Llama 3.2-Vision image processor does, rather than onto black by a plain ``convert``.
    """
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _refuse(
                    f"image is {width}x{height} ({width * height} pixels), more than the "
                    f"{max_pixels} allowed",
                    "image_too_large",
                )
            image.load()  # for GIF/animated WEBP: the first frame only
            if image.has_transparency_data:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as exc:
        raise _refuse(f"image has too many pixels: {exc}", "image_too_large") from None
    except UnidentifiedImageError:
        message = f"image data is not a PNG, JPEG, WEBP or GIF image{hint}"
        raise _refuse(message, "invalid_image") from None
    except Exception as exc:  # Pillow raises many types for corrupt input; all are the client's
        raise _refuse(f"image could not be decoded ({exc}){hint}", "invalid_image") from None


class ImageLoader:
    """Loads image URLs under ``ImageLimits``. One per app; call ``aclose`` on shutdown.

    A supplied ``client`` must not use a proxy: a proxy would resolve the name itself, which
    undoes address pinning. The default client ignores proxy environment variables.
    """

    def __init__(self, limits: ImageLimits, client: httpx.AsyncClient | None = None) -> None:
        self._limits = limits
        self._owns_client = client is None
        # No keep-alive: a pooled TLS connection keyed by IP could otherwise be reused for a
        # different hostname on the same IP without verifying that name's certificate.
        self._client = client or httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._allow_hosts: set[str] = set()
        self._allow_nets: list[IPNetwork] = []
        for entry in limits.allow:
            try:
                self._allow_nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                self._allow_hosts.add(entry.strip().lower().rstrip("."))

    async def __aenter__(self) -> ImageLoader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def load(self, url: str) -> Image.Image:
        """Return the image at ``url`` as RGB, or raise ``InvalidRequest`` saying why not."""
        if not isinstance(url, str) or not url.strip():
            raise _refuse("image_url.url must be a non-empty string")
        url = url.strip()
        hint = ""
        if url[:5].lower() == "data:":
            data = self._decode_data_url(url)
        else:
            data, content_type = await self._fetch(url)
            hint = f" (the server sent Content-Type {content_type!r})" if content_type else ""
        return await asyncio.to_thread(decode_image, data, self._limits.max_pixels, hint)

    async def decode(self, data: bytes) -> Image.Image:
        """Bytes already at hand (e.g. a file the server ships) under the same caps as a URL."""
        if len(data) > self._limits.max_bytes:
            raise _refuse(self._too_many_bytes(), "image_too_large")
        return await asyncio.to_thread(decode_image, data, self._limits.max_pixels)

    def _decode_data_url(self, url: str) -> bytes:
        """Strictly decode a base64 data URL of an allowed image type, within the byte cap."""
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise _refuse("data URL is malformed: no ',' before the data")
        params = [p.strip().lower() for p in header.split(";")]
        media_type = params[0]
        if media_type not in DATA_MEDIA_TYPES:
            raise _refuse(
                f"data URL media type {media_type or '(none)'!r} is not allowed; use image/png, "
                "image/jpeg, image/webp or image/gif"
            )
        if "base64" not in params[1:]:
            raise _refuse("data URL must be base64-encoded (data:image/png;base64,...)")
        payload = payload.strip()
        # Refuse from the encoded length, before spending memory on decoding it.
        if len(payload) > 4 * ((self._limits.max_bytes + 2) // 3):
            raise _refuse(self._too_many_bytes(), "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _refuse(f"data URL is not valid base64: {exc}") from None
        if len(data) > self._limits.max_bytes:
            raise _refuse(self._too_many_bytes(), "image_too_large")
        return data

    def _too_many_bytes(self) -> str:
        return f"image is larger than the {self._limits.max_bytes} bytes allowed"

    def _parse_url(self, raw: str | httpx.URL, base: httpx.URL | None = None) -> httpx.URL:
        """Parse (and for redirects, resolve) a URL; refuse schemes, credentials, empty hosts."""
        try:
            url = base.join(raw) if base is not None else httpx.URL(raw)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise _refuse(f"image URL is not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https"):
            raise _refuse(
                f"image URL scheme {url.scheme or '(none)'!r} is not allowed; use https://, "
                "http:// or a data:image/...;base64 URL"
            )
        if url.userinfo:
            raise _refuse("image URL must not contain credentials (user:password@)")
        if not url.raw_host:
            raise _refuse("image URL has no host")
        return url

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses a name resolves to (tests replace this to simulate DNS)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise _refuse(
                f"could not fetch image: cannot resolve host {host!r} ({exc})", "image_fetch_failed"
            ) from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        return list(dict.fromkeys(addresses))

    async def _checked_addresses(self, url: httpx.URL) -> list[IPAddress]:
        """Resolve the URL's host once and refuse if ANY address is not public (nor allowed)."""
        host = url.raw_host.decode("ascii")
        literal = _ip_literal(host)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = [literal] if literal is not None else await self._resolve(host, port)
        if not addresses:
            raise _refuse(
                f"could not fetch image: host {host!r} has no address", "image_fetch_failed"
            )
        if host.lower().rstrip(".") in self._allow_hosts:
            return addresses
        for address in addresses:
            forms = [address, _embedded_ipv4(address)]
            if any(a is not None and a in net for a in forms for net in self._allow_nets):
                continue
            if problem := address_problem(address):
                raise _refuse(f"image URL resolves to a {problem} address ({address}); refused")
        return addresses

    async def _fetch(self, url: str) -> tuple[bytes, str]:
        """Fetch under one overall deadline (slow-drip servers), following redirects by hand."""
        current = self._parse_url(url)
        try:
            async with asyncio.timeout(self._limits.timeout_s):
                for _ in range(self._limits.max_redirects + 1):
                    addresses = await self._checked_addresses(current)
                    result = await self._get_any(current, addresses)
                    if isinstance(result, httpx.URL):
                        current = result
                        continue
                    return result
        except (TimeoutError, httpx.TimeoutException):
            raise _refuse("could not fetch image: timed out", "image_fetch_failed") from None
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise _refuse(f"could not fetch image: {reason}", "image_fetch_failed") from None
        raise _refuse(f"image URL redirected more than {self._limits.max_redirects} times; refused")

    async def _get_any(
        self, url: httpx.URL, addresses: list[IPAddress]
    ) -> tuple[bytes, str] | httpx.URL:
        """Try each checked address in turn (a name may list an unreachable IPv6 first)."""
        error: httpx.ConnectError | None = None
        for address in addresses:
            try:
                return await self._get_pinned(url, address)
            except httpx.ConnectError as exc:
                error = exc
        raise error or _refuse("could not fetch image: no address", "image_fetch_failed")

    async def _get_pinned(
        self, url: httpx.URL, address: IPAddress
    ) -> tuple[bytes, str] | httpx.URL:
        """GET ``url`` from exactly ``address``; return (body, content type) or the redirect URL."""
        host = url.raw_host.decode("ascii")
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        request = self._client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={
                "Host": url.netloc.decode("ascii"),
                "Accept": "image/png, image/jpeg, image/webp, image/gif",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
            timeout=httpx.Timeout(self._limits.timeout_s),
            extensions=extensions,
        )
        response = await self._client.send(request, stream=True, follow_redirects=False)
        try:
            status = response.status_code
            if status in REDIRECT_STATUSES and "location" in response.headers:
                return self._parse_url(response.headers["location"], base=url)
            if not 200 <= status < 300:
                raise _refuse(
                    f"could not fetch image: the server answered HTTP {status}",
                    "image_fetch_failed",
                )
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                # Compressed transfer would let a small body inflate past the byte cap.
                raise _refuse(
                    f"could not fetch image: Content-Encoding {encoding!r} is not accepted",
                    "image_fetch_failed",
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self._limits.max_bytes:
                raise _refuse(self._too_many_bytes(), "image_too_large")
            body = bytearray()
            async for chunk in response.aiter_bytes():  # identity: bytes == raw
                body += chunk
                if len(body) > self._limits.max_bytes:
                    raise _refuse(self._too_many_bytes(), "image_too_large")
            return bytes(body), response.headers.get("content-type", "")
        finally:
            await response.aclose()
