"""Images and videos of a request: ``data:`` URLs and local files, with size and pixel limits.

Remote URLs (``http://``, ``https://``) are never fetched. A server reads local files only below the
``media_root`` its operator allows (``bard-vl serve --media-root DIR``); ``bard-vl infer`` reads the
paths its user gives.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

#: image formats a request may hold (PIL plugin names); others (EPS and PostScript, which need Ghostscript,
#: PDF, ICNS, ...) are refused before any decoder sees them
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: longest local path accepted, in characters (after %-decoding)
MAX_PATH_CHARS = 1024


class RequestError(ValueError):
    """A problem with what the client sent; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class MediaLimits:
    """What a request may hold.

    Attributes:
        media_root: local files are read only below this directory (``None``: no local files), unless
            ``any_path`` is set (the ``infer`` command).
        max_image_pixels: most pixels of one decoded image (width x height), checked before decoding.
        max_media_bytes: most bytes of one image or video (file or decoded ``data:`` URL).
        max_images, max_videos: most images / videos in one request.
    """

    media_root: Path | None = None
    any_path: bool = False
    max_image_pixels: int = 4096 * 4096
    max_media_bytes: int = 32 * 1024 * 1024
    max_images: int = 8
    max_videos: int = 1


def _decode_data_url(url: str, kind: str, limits: MediaLimits, param: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<payload>`` -> (mime, bytes)."""
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(f"{param}: a data: URL must be 'data:<mime type>;base64,<data>'", param=param)
    mime = header[: -len(";base64")].strip().lower()
    if mime and not mime.startswith(f"{kind}/"):
        raise RequestError(f"{param}: expected an {kind}/* data: URL, got {mime!r}", param=param)
    if len(payload) * 3 // 4 > limits.max_media_bytes:
        raise RequestError(f"{param}: the {kind} is larger than {limits.max_media_bytes} bytes", status=413, param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param}: the data: URL is not valid base64", param=param) from None
    return mime, data


def _path_text(url: str, param: str, decode: bool) -> str:
    """The path of a ``file://`` URL or a plain path, %-decoded when ``decode`` (a server request: paths are URL
    text); refuses NUL bytes, over-long paths and ``file://`` URLs naming another host."""
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(f"{param}: a file:// URL must name a local file (host {parts.netloc!r})", param=param)
        path_text = unquote(parts.path, errors="strict") if decode else parts.path
    else:
        path_text = unquote(url, errors="strict") if decode else url
    if "\x00" in path_text:
        raise RequestError(f"{param}: the path contains a NUL byte", param=param)
    if len(path_text) > MAX_PATH_CHARS:
        raise RequestError(f"{param}: the path has {len(path_text)} characters, more than {MAX_PATH_CHARS}", param=param)
    if not path_text:
        raise RequestError(f"{param}: empty path", param=param)
    return path_text


def _local_path(url: str, limits: MediaLimits, param: str) -> Path:
    try:
        path_text = _path_text(url, param, decode=not limits.any_path)
    except UnicodeDecodeError:
        raise RequestError(f"{param}: the %-encoded path is not valid UTF-8", param=param) from None
    try:
        return _confined(path_text, limits, param)
    except (OSError, ValueError) as exc:
        if isinstance(exc, RequestError):
            raise
        raise RequestError(f"{param}: not a usable path ({type(exc).__name__}: {exc})", param=param) from None


def _confined(path_text: str, limits: MediaLimits, param: str) -> Path:
    path = Path(path_text).expanduser() if limits.any_path else Path(path_text)
    if limits.any_path:
        resolved = path.resolve()
    else:
        if limits.media_root is None:
            raise RequestError(
                f"{param}: local files are not served (start the server with --media-root DIR to allow files below DIR; "
                "or send the image inline as a data: URL)",
                status=403,
                param=param,
            )
        root = Path(limits.media_root).resolve()
        resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if resolved != root and root not in resolved.parents:
            raise RequestError(f"{param}: {path_text!r} is outside the allowed media root", status=403, param=param)
    if not resolved.is_file():
        raise RequestError(f"{param}: no such file: {path_text!r}", param=param)
    if resolved.stat().st_size > limits.max_media_bytes:
        raise RequestError(f"{param}: the file is larger than {limits.max_media_bytes} bytes", status=413, param=param)
    return resolved


def _refuse_remote(url: str, param: str) -> None:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise RequestError(f"{param}: remote URLs are not fetched; send a data: URL or a file path", param=param)


def load_image(url: str, limits: MediaLimits, param: str = "image_url") -> Any:
    """A ``data:`` URL or a local path -> an RGB PIL image (pixel limit checked before decoding)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}: expected a non-empty URL string", param=param)
    _refuse_remote(url, param)
    if url.startswith("data:"):
        _, data = _decode_data_url(url, "image", limits, param)
        source: Any = io.BytesIO(data)
    else:
        source = _local_path(url, limits, param)
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise RequestError(
                    f"{param}: the image has {width}x{height} = {width * height} pixels, more than the limit of "
                    f"{limits.max_image_pixels}",
                    status=413,
                    param=param,
                )
            if width == 0 or height == 0:
                raise RequestError(f"{param}: the image is empty", param=param)
            return image.convert("RGB")
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"{param}: not a readable image in an allowed format ({', '.join(IMAGE_FORMATS)})",
                           param=param) from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise RequestError(f"{param}: not a readable image ({type(exc).__name__}: {exc})", param=param) from None


def resolve_video(url: str, limits: MediaLimits, param: str = "video_url", tmp_dir: str | None = None) -> str:
    """A ``data:`` URL (written to a temporary file in ``tmp_dir``) or a local path -> a video file path."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}: expected a non-empty URL string", param=param)
    _refuse_remote(url, param)
    if url.startswith("data:"):
        mime, data = _decode_data_url(url, "video", limits, param)
        suffix = "." + (mime.split("/", 1)[1] if "/" in mime else "mp4")
        fd, name = tempfile.mkstemp(suffix=suffix if suffix.isascii() and len(suffix) < 8 else ".mp4", dir=tmp_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name
    return str(_local_path(url, limits, param))


__all__ = ["IMAGE_FORMATS", "MAX_PATH_CHARS", "MediaLimits", "RequestError", "load_image", "resolve_video"]
