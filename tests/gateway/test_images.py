"""Tests for gateway.images: data URLs, decoding limits, SSRF refusals and fetching.

A real HTTP server on 127.0.0.1 serves the fetch cases. Loopback is refused by default, so the
tests that must fetch allow-list it explicitly, and separate tests prove the same URLs are refused
without the allow-list.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from gateway.errors import InvalidRequest
from gateway.images import ImageLimits, ImageLoader, IPAddress
from gateway.settings import Settings

pytestmark = pytest.mark.asyncio

LOOPBACK = ("127.0.0.0/8",)


def limits(**overrides: object) -> ImageLimits:
    values: dict[str, object] = {
        "max_bytes": 5_000_000,
        "max_pixels": 4_000_000,
        "timeout_s": 2.0,
        "max_redirects": 3,
        "allow": (),
    }
    values.update(overrides)
    return ImageLimits(**values)  # type: ignore[arg-type]


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its IHDR chunk but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


RED_PNG = encode(Image.new("RGB", (32, 16), (255, 0, 0)), "PNG")


async def refused(loader: ImageLoader, url: str) -> InvalidRequest:
    """Load ``url``, expect a refusal, and check the fields every refusal must carry."""
    with pytest.raises(InvalidRequest) as info:
        await loader.load(url)
    error = info.value
    assert error.status_code == 400
    assert error.param == "messages"
    assert error.envelope()["error"]["type"] == "invalid_request_error"
    return error


# --------------------------------------------------------------------------- test HTTP server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def send_body(self, body: bytes, content_type: str = "image/png", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        port = int(self.connection.getsockname()[1])
        path = self.path
        try:
            if path == "/img.png":
                self.send_body(RED_PNG)
            elif path.startswith("/redirect/"):
                hops = int(path.rsplit("/", 1)[1])
                self.redirect(f"/redirect/{hops - 1}" if hops > 1 else "/img.png")  # N hops
            elif path == "/to-loopback-ip":
                self.redirect(f"http://127.0.0.1:{port}/img.png")
            elif path == "/to-metadata":
                self.redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/to-ftp":
                self.redirect("ftp://example.com/img.png")
            elif path == "/host-check":
                expected = f"pinned.test:{port}"
                ok = self.headers.get("Host") == expected
                self.send_body(RED_PNG if ok else b"wrong host", status=200 if ok else 421)
            elif path == "/big-declared":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(50_000_000))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
            elif path == "/big-stream":  # no Content-Length: only the streaming cap stops it
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(800):  # 50 MB at most, if nobody hangs up
                    self.wfile.write(b"\0" * 65536)
            elif path == "/slow":
                time.sleep(1.5)
                self.send_body(RED_PNG)
            elif path == "/drip":  # every read is quick, the whole body never ends in time
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(30):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/text":
                self.send_body(b"<html>not an image</html>", "text/html")
            elif path == "/gzip":
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"\x1f\x8b\0\0")
            else:
                self.send_body(b"not found", "text/plain", status=404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (byte cap, timeout)


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """Serve the routes above on 127.0.0.1 and yield the port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------- settings


async def test_limits_from_settings() -> None:
    settings = Settings(
        max_image_bytes=123,
        max_image_pixels=456,
        image_fetch_timeout_s=1.5,
        image_fetch_max_redirects=2,
        image_fetch_allow=["localhost", "10.0.0.0/8"],
    )
    assert ImageLimits.from_settings(settings) == ImageLimits(
        123, 456, 1.5, 2, ("localhost", "10.0.0.0/8")
    )


# --------------------------------------------------------------------------- data URLs


@pytest.mark.parametrize(
    ("fmt", "media_type", "mode"),
    [
        ("PNG", "image/png", "RGBA"),
        ("JPEG", "image/jpeg", "RGB"),
        ("JPEG", "image/jpg", "CMYK"),
        ("WEBP", "image/webp", "RGB"),
        ("GIF", "image/gif", "P"),
    ],
)
async def test_good_data_urls(fmt: str, media_type: str, mode: str) -> None:
    source = Image.new("RGB", (40, 30), (0, 0, 255)).convert(mode)
    async with ImageLoader(limits()) as loader:
        image = await loader.load(data_url(encode(source, fmt), media_type))
    assert image.size == (40, 30)
    assert image.mode == "RGB"
    pixel = image.getpixel((5, 5))
    assert isinstance(pixel, tuple) and pixel[2] > 200  # still blue after the round trip


async def test_gif_first_frame_and_transparency_on_white() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    green = Image.new("RGB", (8, 8), (0, 255, 0))
    gif = encode(red, "GIF", save_all=True, append_images=[green])
    clear = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    async with ImageLoader(limits()) as loader:
        first = await loader.load(data_url(gif, "image/gif"))
        flattened = await loader.load(data_url(clear))
    assert first.getpixel((0, 0)) == (255, 0, 0)
    assert flattened.mode == "RGB" and flattened.getpixel((0, 0)) == (255, 255, 255)


async def test_declared_type_may_differ_from_real_format() -> None:
    async with ImageLoader(limits()) as loader:
        image = await loader.load(data_url(RED_PNG, "image/jpeg"))
    assert image.size == (32, 16)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("data:image/png;base64,!!!not base64!!!", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # bad padding
        ("data:text/plain;base64,aGVsbG8=", "'text/plain' is not allowed"),
        ("data:image/svg+xml;base64,PHN2Zy8+", "'image/svg+xml' is not allowed"),
        ("data:;base64,aGVsbG8=", "'(none)' is not allowed"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64", "malformed"),
    ],
)
async def test_bad_data_urls(url: str, needle: str) -> None:
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, url)
    assert error.code == "invalid_image_url"
    assert needle in error.message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"hello, I am text, not a picture", "not a PNG, JPEG, WEBP or GIF image"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "not a PNG, JPEG, WEBP or GIF image"),
        (RED_PNG[: len(RED_PNG) // 2], "could not be decoded"),  # truncated
    ],
    ids=["text", "bmp", "truncated"],
)
async def test_non_image_or_corrupt_bytes(data: bytes, needle: str) -> None:
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, data_url(data, "image/png"))
    assert error.code == "invalid_image"
    assert needle in error.message


async def test_oversize_bytes() -> None:
    noise = encode(Image.frombytes("L", (100, 100), random.Random(0).randbytes(10_000)), "PNG")
    assert len(noise) > 2000
    async with ImageLoader(limits(max_bytes=2000)) as loader:
        error = await refused(loader, data_url(noise))
        huge = await refused(loader, "data:image/png;base64," + "A" * 10_000_000)
    assert error.code == huge.code == "image_too_large"
    assert "larger than the 2000 bytes allowed" in error.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
async def test_pixel_bomb_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (10_000, 10_000), 1), "PNG")
    assert len(bomb) < 100_000  # small on disk, 100 megapixels decoded
    started = time.monotonic()
    async with ImageLoader(limits(max_pixels=1_000_000)) as loader:
        error = await refused(loader, data_url(bomb))
        ok = await loader.load(data_url(encode(Image.new("RGB", (1000, 1000)), "PNG")))
    assert error.code == "image_too_large"
    assert "10000x10000 (100000000 pixels), more than the 1000000 allowed" in error.message
    assert time.monotonic() - started < 2
    assert ok.size == (1000, 1000)


async def test_pillow_bomb_guard_becomes_400() -> None:
    """Above Pillow's own limit its DecompressionBombError must still be our 400."""
    async with ImageLoader(limits(max_pixels=10**10)) as loader:
        error = await refused(loader, data_url(png_header_only(20_000, 20_000)))
    assert error.code == "image_too_large"
    assert "too many pixels" in error.message


# --------------------------------------------------------------------------- refused URLs


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ftp://example.com/a.png", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://example.com/", "scheme 'gopher' is not allowed"),
        ("javascript:alert(1)", "scheme 'javascript' is not allowed"),
        ("http://user:pass@example.com/a.png", "must not contain credentials"),
        ("http:///a.png", "has no host"),
        ("", "non-empty string"),
    ],
)
async def test_refused_urls(url: str, needle: str) -> None:
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, url)
    assert error.code == "invalid_image_url"
    assert needle in error.message


@pytest.mark.parametrize(
    ("url", "problem", "address"),
    [
        ("http://127.0.0.1/a.png", "loopback", "127.0.0.1"),
        ("http://10.0.0.1/a.png", "private", "10.0.0.1"),
        ("http://192.168.1.20:8080/a.png", "private", "192.168.1.20"),
        ("http://172.16.5.4/a.png", "private", "172.16.5.4"),
        ("http://169.254.169.254/latest/meta-data/", "link-local", "169.254.169.254"),
        ("http://100.64.0.1/", "non-public", "100.64.0.1"),
        ("http://0.0.0.0/", "unspecified", "0.0.0.0"),
        ("http://224.0.0.1/", "multicast", "224.0.0.1"),
        ("http://[::1]/a.png", "loopback", "::1"),
        ("http://[fe80::1]/a.png", "link-local", "fe80::1"),
        ("http://[fd00::1]/a.png", "private", "fd00::1"),
        ("http://[::ffff:127.0.0.1]/a.png", "loopback", "::ffff:7f00:1"),
        ("http://[::ffff:169.254.169.254]/", "link-local", "::ffff:a9fe:a9fe"),
        ("http://[2002:7f00:1::]/", "loopback", "2002:7f00:1::"),  # 6to4 of 127.0.0.1
        ("http://[64:ff9b::a00:1]/", "private", "64:ff9b::a00:1"),  # NAT64 of 10.0.0.1
        ("http://2130706433/a.png", "loopback", "127.0.0.1"),  # decimal
        ("http://0x7f.1/a.png", "loopback", "127.0.0.1"),  # hex, short form
        ("http://0177.1/a.png", "loopback", "127.0.0.1"),  # octal, short form
        ("http://0xa9.0xfe.0xa9.0xfe/", "link-local", "169.254.169.254"),
    ],
)
async def test_non_public_addresses_refused(url: str, problem: str, address: str) -> None:
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, url)
    assert error.code == "invalid_image_url"
    shown = ipaddress.ip_address(address)  # str() of IPv4-mapped forms differs across Pythons
    assert error.message == f"image URL resolves to a {problem} address ({shown}); refused"


async def test_any_private_resolved_address_refuses_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.1.2.3")]

    async with ImageLoader(limits()) as loader:
        monkeypatch.setattr(loader, "_resolve", resolve)
        error = await refused(loader, "https://mixed.example/a.png")
    assert "private address (10.1.2.3)" in error.message


async def test_localhost_name_refused_without_allow_list(server: int) -> None:
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, f"http://localhost:{server}/img.png")
    assert error.code == "invalid_image_url"
    assert "resolves to a loopback address" in error.message


async def test_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_such_host(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_such_host)
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, "http://no-such-host.invalid/a.png")
    assert error.code == "image_fetch_failed"
    assert "cannot resolve host 'no-such-host.invalid'" in error.message


# --------------------------------------------------------------------------- fetching


async def test_fetch_png_only_with_allow_list(server: int) -> None:
    url = f"http://127.0.0.1:{server}/img.png"
    async with ImageLoader(limits()) as loader:
        error = await refused(loader, url)
    assert "loopback address (127.0.0.1)" in error.message
    for allow in (LOOPBACK, ("127.0.0.1",)):
        async with ImageLoader(limits(allow=allow)) as loader:
            image = await loader.load(url)
        assert (image.size, image.mode) == ((32, 16), "RGB")


async def test_fetch_by_allowed_hostname(server: int) -> None:
    async with ImageLoader(limits(allow=("localhost",))) as loader:
        image = await loader.load(f"http://localhost:{server}/img.png")
    assert image.size == (32, 16)


async def test_redirect_to_loopback_ip_refused_although_first_hop_allowed(server: int) -> None:
    """Only the name "localhost" is allowed; its redirect to 127.0.0.1 is checked afresh."""
    url = f"http://localhost:{server}/to-loopback-ip"
    async with ImageLoader(limits(allow=("localhost",))) as loader:
        error = await refused(loader, url)
    assert error.message == "image URL resolves to a loopback address (127.0.0.1); refused"
    async with ImageLoader(limits(allow=LOOPBACK)) as loader:  # control: allowed target works
        assert (await loader.load(url)).size == (32, 16)


async def test_redirect_to_metadata_or_bad_scheme_refused(server: int) -> None:
    async with ImageLoader(limits(allow=LOOPBACK)) as loader:
        metadata = await refused(loader, f"http://127.0.0.1:{server}/to-metadata")
        ftp = await refused(loader, f"http://127.0.0.1:{server}/to-ftp")
    assert "link-local address (169.254.169.254)" in metadata.message
    assert "scheme 'ftp' is not allowed" in ftp.message


async def test_redirect_limit(server: int) -> None:
    async with ImageLoader(limits(allow=LOOPBACK, max_redirects=3)) as loader:
        image = await loader.load(f"http://127.0.0.1:{server}/redirect/3")
        error = await refused(loader, f"http://127.0.0.1:{server}/redirect/4")
    assert image.size == (32, 16)
    assert error.code == "invalid_image_url"
    assert "redirected more than 3 times" in error.message


async def test_connects_to_the_checked_address(
    server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinning: the name is resolved once and the request goes to that IP with the original Host."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[IPAddress]:
        calls.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    async with ImageLoader(limits(allow=LOOPBACK)) as loader:
        monkeypatch.setattr(loader, "_resolve", resolve)
        image = await loader.load(f"http://pinned.test:{server}/host-check")
    assert image.size == (32, 16)  # the server checked Host: pinned.test:<port>
    assert calls == ["pinned.test"]


async def test_https_pinning_keeps_name_for_sni_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=RED_PNG, headers={"Content-Type": "image/png"})

    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.216.34")]

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        loader = ImageLoader(limits(), client=client)
        monkeypatch.setattr(loader, "_resolve", resolve)
        image = await loader.load("https://images.example/cat.png")
    assert image.size == (32, 16)
    (request,) = seen
    assert str(request.url) == "https://93.184.216.34/cat.png"
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"


async def test_upstream_404(server: int) -> None:
    async with ImageLoader(limits(allow=LOOPBACK)) as loader:
        error = await refused(loader, f"http://127.0.0.1:{server}/missing.png")
    assert error.code == "image_fetch_failed"
    assert error.message == "could not fetch image: the server answered HTTP 404"


async def test_non_image_response(server: int) -> None:
    async with ImageLoader(limits(allow=LOOPBACK)) as loader:
        error = await refused(loader, f"http://127.0.0.1:{server}/text")
    assert error.code == "invalid_image"
    assert "not a PNG, JPEG, WEBP or GIF image" in error.message and "text/html" in error.message


async def test_compressed_response_refused(server: int) -> None:
    async with ImageLoader(limits(allow=LOOPBACK)) as loader:
        error = await refused(loader, f"http://127.0.0.1:{server}/gzip")
    assert "Content-Encoding 'gzip' is not accepted" in error.message


@pytest.mark.parametrize("path", ["/big-declared", "/big-stream"])
async def test_huge_body_aborted(server: int, path: str) -> None:
    started = time.monotonic()
    async with ImageLoader(limits(allow=LOOPBACK, max_bytes=100_000)) as loader:
        error = await refused(loader, f"http://127.0.0.1:{server}{path}")
    assert error.code == "image_too_large"
    assert error.message == "image is larger than the 100000 bytes allowed"
    assert time.monotonic() - started < 1.5  # stopped at the cap, not after 50 MB


@pytest.mark.parametrize("path", ["/slow", "/drip"])
async def test_timeout(server: int, path: str) -> None:
    started = time.monotonic()
    async with ImageLoader(limits(allow=LOOPBACK, timeout_s=0.4)) as loader:
        error = await refused(loader, f"http://127.0.0.1:{server}{path}")
    assert error.code == "image_fetch_failed"
    assert error.message == "could not fetch image: timed out"
    assert time.monotonic() - started < 1.2


async def test_connection_refused() -> None:
    async with ImageLoader(limits(allow=LOOPBACK)) as loader:
        error = await refused(loader, "http://127.0.0.1:1/img.png")
    assert error.code == "image_fetch_failed"
    assert error.message.startswith("could not fetch image:")
