"""The API's HTTP/1.1 contract, checked on raw sockets: framing (Content-Length, chunked bodies both ways),
keep-alive and Connection, pipelining, Expect: 100-continue, limits, malformed input, unknown methods, HEAD,
absolute-form targets, idle and slow-client timeouts, clients that vanish, and Server-Sent Events.

Every check reads the bytes the server really sent: a small client below writes requests as given and parses
one response at a time (status line, headers, body by Content-Length, chunked, or up to the close), keeping
whatever follows for the next one, so stray or missing bytes show up as a wrong next response.

Two servers: `node` (asyncllm all: API and worker, default limits) and `tight` (asyncllm api with a 1 KiB body
limit and a 1 s idle timeout), both on ports in 25100-25199.
"""

import json
import os
import resource
import re
import select
import socket
import struct
import time
import urllib.parse

import pytest

from conftest import CONV_ID_RE, assert_error, llm_answer, unique

TIGHT_MAX_BODY = 1024
TIGHT_IDLE_S = 1
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

# ------------------------------------------------------------------------------------------------
# A raw HTTP/1.1 client
# ------------------------------------------------------------------------------------------------


class RawResponse:
    def __init__(self, version, status, reason, header_list, head):
        self.version = version  # "HTTP/1.1"
        self.status = status
        self.reason = reason
        self.header_list = header_list  # [(lower-case name, value)] in order, duplicates kept
        self.headers = {k: v for k, v in header_list}  # last one wins (what conftest.assert_error reads)
        self.head = head  # the raw status line and headers, up to and including the blank line
        self.body = b""
        self.chunks = None  # chunked: the chunks' data, in order
        self.trailers = None
        self.until_close = False  # body delimited by the connection's close

    def tokens(self, name):
        """The comma-separated tokens of every `name` header, lower-case."""
        return [t.strip().lower() for k, v in self.header_list if k == name for t in v.split(",") if t.strip()]

    def count(self, name):
        return sum(1 for k, _ in self.header_list if k == name)

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError as e:
            raise AssertionError(f"body is not JSON ({e}): {self!r}") from None

    def __repr__(self):
        return f"<RawResponse {self.version} {self.status} {self.header_list} {self.body[:300]!r}>"


class RawConn:
    """One TCP connection to the API. send() writes bytes as they are; read_response() parses one response."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.reset = False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def send_tolerant(self, data):
        """Sends, accepting that the server may close or reset the connection meanwhile (a request it refuses
        before it has read all of it); its answer is read afterwards."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _fill(self, deadline, what):
        """Reads some more bytes into buf; fails the test on a timeout or an unexpected close."""
        if self.eof:
            raise AssertionError(f"connection closed by the server while waiting for {what}; got {self.buf[:500]!r}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {what}; got {self.buf[:500]!r}")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"timed out waiting for {what}; got {self.buf[:500]!r}") from None
        except ConnectionResetError:
            self.eof = self.reset = True
            data = b""
        if not data:
            self.eof = True
            raise AssertionError(f"connection closed by the server while waiting for {what}; got {self.buf[:500]!r}")
        self.buf += data

    def _read_until(self, sep, deadline, what):
        while sep not in self.buf:
            self._fill(deadline, what)
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _read_exact(self, n, deadline, what):
        while len(self.buf) < n:
            self._fill(deadline, what)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self, timeout=None):
        """The status line and headers of the next response (the server must end its lines with CRLF)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        head = self._read_until(b"\r\n\r\n", deadline, "a response's headers")
        lines = head[:-4].split(b"\r\n")
        m = re.fullmatch(rb"(HTTP/1\.[01]) ([0-9]{3}) ?([^\r\n]*)", lines[0])
        assert m, f"bad status line {lines[0]!r} in {head!r}"
        hl = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), f"bad header line {line!r} in {head!r}"
            hl.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
        return RawResponse(m.group(1).decode(), int(m.group(2)), m.group(3).decode("latin-1"), hl, head)

    def read_chunk(self, timeout=None):
        """One chunk of a chunked body: its data (b"" for the last chunk, whose trailers are left in buf)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        line = self._read_until(b"\r\n", deadline, "a chunk-size line")
        m = re.fullmatch(rb"([0-9A-Fa-f]+)(;[^\r\n]*)?\r\n", line)
        assert m, f"bad chunk-size line {line!r}"
        size = int(m.group(1), 16)
        if size == 0:
            return b""
        data = self._read_exact(size, deadline, f"a chunk of {size} bytes")
        crlf = self._read_exact(2, deadline, "the CRLF after a chunk")
        assert crlf == b"\r\n", f"chunk of {size} bytes not followed by CRLF: {crlf!r}"
        return data

    def read_trailers(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        trailers = {}
        while True:
            line = self._read_until(b"\r\n", deadline, "the trailer section")
            if line == b"\r\n":
                return trailers
            name, colon, value = line[:-2].partition(b":")
            assert colon, f"bad trailer line {line!r}"
            trailers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")

    def read_body(self, r, head_request=False, timeout=None):
        """Reads r's body, framed as RFC 9112 section 6.3 says."""
        deadline_s = timeout or self.timeout
        if head_request or 100 <= r.status < 200 or r.status in (204, 304):
            return r
        if "transfer-encoding" in r.headers:
            assert r.tokens("transfer-encoding")[-1:] == ["chunked"], f"unexpected Transfer-Encoding: {r!r}"
            assert "content-length" not in r.headers, f"both Content-Length and Transfer-Encoding: {r!r}"
            r.chunks = []
            while True:
                c = self.read_chunk(deadline_s)
                if not c:
                    break
                r.chunks.append(c)
            r.trailers = self.read_trailers(deadline_s)
            r.body = b"".join(r.chunks)
        elif "content-length" in r.headers:
            assert r.count("content-length") == 1, f"several Content-Length headers: {r!r}"
            cl = r.headers["content-length"]
            assert re.fullmatch(r"[0-9]+", cl), f"bad Content-Length {cl!r}: {r!r}"
            r.body = self._read_exact(int(cl), time.monotonic() + deadline_s, f"a body of {cl} bytes")
        else:  # delimited by the close
            deadline = time.monotonic() + deadline_s
            while True:
                try:
                    self._fill(deadline, "the end of a close-delimited body")
                except AssertionError:
                    if not self.eof:
                        raise
                    break
            r.body, self.buf, r.until_close = self.buf, b"", True
        return r

    def read_response(self, head_request=False, timeout=None):
        return self.read_body(self.read_head(timeout), head_request, timeout)

    def request(self, data, **kw):
        self.send(data)
        return self.read_response(**kw)

    def wait_closed(self, timeout):
        """Waits for the server to close the connection (EOF or reset). Returns (closed, bytes received before
        that, seconds waited)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        got = self.buf
        self.buf = b""
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, got, time.monotonic() - t0
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return False, got, time.monotonic() - t0
            except ConnectionResetError:
                self.eof = self.reset = True
                break
            if not data:
                self.eof = True
                break
            got += data
        return True, got, time.monotonic() - t0

    def assert_closed(self, timeout=3.0):
        """The server closes the connection within timeout seconds, without sending anything more."""
        closed, extra, _ = self.wait_closed(timeout)
        assert closed, f"the server did not close the connection within {timeout} s (sent {extra[:300]!r})"
        assert extra == b"", f"bytes after the response before the close: {extra[:300]!r}"

    def assert_quiet(self, seconds=0.3):
        """Nothing more arrives for a while and the connection stays open (no stray bytes after a response)."""
        closed, extra, _ = self.wait_closed(seconds)
        assert extra == b"", f"unexpected bytes after the response: {extra[:300]!r}"
        assert not closed, "the server closed a keep-alive connection"


def post_answer(body, extra_headers=b"", version=b"HTTP/1.1"):
    """The bytes of a POST /answer with a Content-Length body."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return (b"POST /answer " + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n" + extra_headers +
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def assert_healthz(r):
    assert r.status == 200, r
    assert r.json() == {"status": "ok"}, r
    assert r.headers.get("content-length") == str(len(r.body)), r


def assert_accepted(r):
    assert r.status == 202, r
    b = r.json()
    assert CONV_ID_RE.match(b.get("conversation_id", "")), r
    return b["conversation_id"]


def healthz_ok(port):
    """A fresh connection to the server still gets GET /healthz answered 200."""
    with RawConn(port) as c:
        assert_healthz(c.request(HEALTHZ))


def error_then_close(port, data, status, timeout=5.0):
    """Sends data on a fresh connection; expects one error answer in OpenAI's shape, then the close."""
    with RawConn(port, timeout=timeout) as c:
        c.send_tolerant(data)
        r = c.read_response()
        assert_error(r, status)
        c.assert_closed()
        return r


def api_port():
    """A free port in 25100-25199 (this suite's share of the machine)."""
    for port in range(25100, 25200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 25100-25199")


def start_on_own_port(cluster, role, **settings):
    """cluster.start(role), listening on a port of api_port() rather than any free one."""
    port = api_port()
    n = cluster.start(role, wait=False, http_port=port, **settings)
    n.port = port
    cluster.wait_ready(n)
    return n


@pytest.fixture(scope="module")
def node(cluster):
    """asyncllm all (API and worker) with the default limits."""
    return start_on_own_port(cluster, "all")


@pytest.fixture(scope="module")
def tight(cluster):
    """An API with a 1 KiB body limit and a 1 s idle timeout."""
    return start_on_own_port(cluster, "api", http_max_body=TIGHT_MAX_BODY, http_idle_timeout_s=TIGHT_IDLE_S)


# ------------------------------------------------------------------------------------------------
# 1-3. Keep-alive and Connection
# ------------------------------------------------------------------------------------------------


def test_keepalive_by_default_two_requests_one_connection(node):
    with RawConn(node.port) as c:
        for _ in range(2):
            r = c.request(HEALTHZ)
            assert r.version == "HTTP/1.1", r
            assert_healthz(r)
            assert "close" not in r.tokens("connection"), r
        c.assert_quiet()


def test_connection_close_is_honoured(node):
    with RawConn(node.port) as c:
        r = c.request(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert_healthz(r)
        assert "close" in r.tokens("connection"), f"no Connection: close in the answer: {r!r}"
        c.assert_closed()


def test_http10_without_connection_header_is_closed(node):
    with RawConn(node.port) as c:
        r = c.request(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert r.status == 200, r
        assert json.loads(r.body) == {"status": "ok"}, r
        assert "keep-alive" not in r.tokens("connection"), r
        if not r.until_close:
            c.assert_closed()


def test_http10_keepalive_stays_open(node):
    req = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with RawConn(node.port) as c:
        r = c.request(req)
        assert_healthz(r)
        assert "keep-alive" in r.tokens("connection"), f"no Connection: keep-alive in the answer: {r!r}"
        c.assert_quiet(0.2)
        assert_healthz(c.request(req))


# ------------------------------------------------------------------------------------------------
# 4. Pipelining and requests in pieces
# ------------------------------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(node):
    with RawConn(node.port) as c:
        c.send(HEALTHZ + post_answer({"prompt": unique("pipelined")}) + HEALTHZ)
        assert_healthz(c.read_response())
        assert_accepted(c.read_response())
        assert_healthz(c.read_response())
        c.assert_quiet()


def test_request_in_small_pieces(node):
    prompt = unique("pieces")
    body = json.dumps({"prompt": prompt}).encode()
    pieces = [b"POST /ans", b"wer HTTP/1.1\r\nHo", b"st: x\r\nContent-Type: appl", b"ication/json\r",
              b"\nContent-Length: %d\r\n" % len(body), b"\r\n", body[:7], body[7:-3], body[-3:]]
    with RawConn(node.port) as c:
        for p in pieces:
            c.send(p)
            time.sleep(0.1)
        cid = assert_accepted(c.read_response())
        assert node.poll(cid).json()["user_prompt"] == prompt
        assert_healthz(c.request(HEALTHZ))


# ------------------------------------------------------------------------------------------------
# 5. Request bodies: chunked, ambiguous, unknown codings
# ------------------------------------------------------------------------------------------------


def chunked_answer(chunks, trailer=b"X-Trailer: yes\r\n"):
    """POST /answer with a chunked body: chunks are (size line, data) pairs; the last chunk carries trailer."""
    return (b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" +
            b"".join(size + b"\r\n" + data + b"\r\n" for size, data in chunks) + b"0\r\n" + trailer + b"\r\n")


def check_chunked_answer(node, req):
    with RawConn(node.port) as c:
        cid = assert_accepted(c.request(req))
        # The body the server decoded is exactly the chunks' data (no sizes, extensions or trailer)...
        assert node.poll(cid).json()["user_prompt"] == "hi"
        # ...and the trailer section was consumed: the next request on the connection parses.
        assert_healthz(c.request(HEALTHZ))


BODY_HI = b'{"prompt":"hi"}'


def test_chunked_request_body(node):
    check_chunked_answer(node, chunked_answer([(b"5", BODY_HI[:5]), (b"3", BODY_HI[5:8]), (b"7", BODY_HI[8:])]))


def test_chunked_request_body_with_chunk_extension(node):
    check_chunked_answer(node, chunked_answer([(b"5;foo=bar", BODY_HI[:5]), (b"a", BODY_HI[5:])]))


def test_content_length_and_transfer_encoding_is_400(node):
    body = b'{"prompt":"hi"}'
    req = (b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) +
           b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    # RFC 9112 6.3: such a message may be a smuggling attempt; the server answers and closes.
    error_then_close(node.port, req, 400)


def test_unknown_transfer_coding_is_501(node):
    req = b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n"
    # The body's length cannot be known: the answer comes without it, and the connection cannot go on.
    error_then_close(node.port, req, 501)


# ------------------------------------------------------------------------------------------------
# 6. Expect: 100-continue
# ------------------------------------------------------------------------------------------------


def test_expect_100_continue(node):
    body = json.dumps({"prompt": unique("continue")}).encode()
    head = (b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with RawConn(node.port, timeout=5) as c:
        c.send(head)
        interim = c.read_head()  # before any body byte was sent
        assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n", f"expected a bare 100 Continue, got {interim.head!r}"
        assert c.buf == b"", f"bytes after the 100 Continue before the body was sent: {c.buf!r}"
        c.send(body)
        assert_accepted(c.read_response())
        assert_healthz(c.request(HEALTHZ))


# ------------------------------------------------------------------------------------------------
# 7. Limits
# ------------------------------------------------------------------------------------------------


def test_headers_over_64k_are_431(node):
    fill = b"".join(b"X-Fill-%03d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    assert len(fill) > 64 * 1024
    error_then_close(node.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fill + b"\r\n", 431)


def test_content_length_far_over_the_limit_is_413_without_the_body(tight):
    cl = 2 * TIGHT_MAX_BODY + 1000
    req = b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % cl
    # The body is never sent: the answer must come anyway.
    error_then_close(tight.port, req, 413)


def test_chunked_body_over_the_limit_is_413(tight):
    req = chunked_answer([(b"1f4", b"x" * 500)] * 6, trailer=b"")  # 3000 bytes of body
    with RawConn(tight.port, timeout=5) as c:
        c.send_tolerant(req)
        assert_error(c.read_response(), 413)
    healthz_ok(tight.port)


# ------------------------------------------------------------------------------------------------
# 8. Malformed requests
# ------------------------------------------------------------------------------------------------


MALFORMED = [
    ("garbage-request-line", b"HELLO\r\n\r\n"),
    ("no-http-version", b"GET /healthz\r\nHost: x\r\n\r\n"),
    ("header-without-colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n"),
    ("content-length-not-a-number", b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("content-length-negative", b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
]


@pytest.mark.parametrize("data", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_request_is_400_and_closed(node, data):
    error_then_close(node.port, data, 400)


def test_bare_lf_line_endings_are_accepted(node):
    with RawConn(node.port) as c:
        assert_healthz(c.request(b"GET /healthz HTTP/1.1\nHost: x\n\n"))
        assert_healthz(c.request(b"GET /healthz HTTP/1.1\nHost: x\n\n"))


# ------------------------------------------------------------------------------------------------
# 9-10. Methods, HEAD, absolute-form targets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,allow", [("/healthz", {"GET"}), ("/answer", {"GET", "POST"})])
def test_unknown_method_is_405_with_allow(node, path, allow):
    with RawConn(node.port) as c:
        r = c.request(b"BREW " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_error(r, 405)
        assert "allow" in r.headers, f"405 without Allow: {r!r}"
        assert set(t.upper() for t in r.tokens("allow")) >= allow and "BREW" not in r.headers["allow"].upper(), r
        # Same answer as a known method that the route does not take.
        other = c.request(b"DELETE " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_error(other, 405)
        assert set(r.tokens("allow")) == set(other.tokens("allow")), (r, other)


def test_head_answer_has_no_body(node):
    with RawConn(node.port) as c:
        r = c.request(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", head_request=True)
        assert 200 <= r.status < 600, r
        c.assert_quiet(0.3)  # no body bytes follow the headers
        assert_healthz(c.request(HEALTHZ))
        # Pipelined behind a HEAD, too.
        c.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + HEALTHZ)
        c.read_response(head_request=True)
        assert_healthz(c.read_response())
        c.assert_quiet(0.1)


def test_absolute_form_target(node):
    with RawConn(node.port) as c:
        assert_healthz(c.request(b"GET http://localhost/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"))


# ------------------------------------------------------------------------------------------------
# 11. Idle and slow clients (the tight API: 1 s idle timeout)
# ------------------------------------------------------------------------------------------------


def test_idle_keepalive_connection_is_closed(tight):
    with RawConn(tight.port) as c:
        assert_healthz(c.request(HEALTHZ))
        closed, extra, waited = c.wait_closed(5.0)
        assert closed and waited <= 3.0, f"idle connection still open after {waited:.1f} s"
        assert extra == b"", f"an idle connection was sent {extra[:300]!r} before its close"


def test_half_request_line_is_closed(tight):
    with RawConn(tight.port) as c:
        c.send(b"GET /hea")
        closed, extra, waited = c.wait_closed(5.0)
        assert closed and waited <= 3.0, f"connection with half a request line still open after {waited:.1f} s"
        if extra:  # a 408 before the close is fine; anything else is not
            assert extra.startswith(b"HTTP/1.1 408 "), f"unexpected answer to half a request line: {extra[:300]!r}"


def test_slow_loris_is_closed(tight):
    limit = TIGHT_IDLE_S + 2.0
    with RawConn(tight.port) as c:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        t0 = time.monotonic()
        closed_at = None
        while time.monotonic() - t0 < limit + 3:
            if not c.send_tolerant(b"a"):
                closed_at = time.monotonic()
                break
            r, _, _ = select.select([c.sock], [], [], 0.3)
            if r:
                closed, extra, _ = c.wait_closed(0.5)
                if closed:
                    closed_at = time.monotonic()
                    if extra:
                        assert extra.startswith(b"HTTP/1.1 408 "), f"unexpected answer to a slow client: {extra[:300]!r}"
                    break
                pytest.fail(f"unexpected bytes to a slow client: {extra[:300]!r}")
        assert closed_at is not None, f"a client trickling a byte every 0.3 s was still connected after {limit + 3:.0f} s"
        assert closed_at - t0 <= limit + 0.5, f"slow client closed after {closed_at - t0:.1f} s (limit {limit:.0f} s)"
    healthz_ok(tight.port)


def test_lingering_close_is_bounded(tight):
    """After answering Connection: close the server half-closes and reads until the client's end (so that an
    unread request does not turn the close into a reset that destroys the answer). A client that keeps sending,
    never closing, must not keep the connection for ever: each byte used to restart the idle timeout."""
    limit = TIGHT_IDLE_S + 3.0  # the bound (whole seconds), the next byte, then the reset it brings back
    with RawConn(tight.port) as c:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert_healthz(c.read_response())
        t0 = time.monotonic()
        closed_at = None
        while time.monotonic() - t0 < limit + 3:
            if not c.send_tolerant(b"x" * 100):
                closed_at = time.monotonic()
                break
            time.sleep(0.3)
        assert closed_at is not None, f"a lingering close fed 100 bytes every 0.3 s still read after {limit + 3:.0f} s"
        assert closed_at - t0 <= limit, f"lingering close ended after {closed_at - t0:.1f} s (limit {limit:.0f} s)"
    healthz_ok(tight.port)


# ------------------------------------------------------------------------------------------------
# 12. Clients that go away
# ------------------------------------------------------------------------------------------------


def test_client_closes_right_after_a_post(node):
    for _ in range(3):
        c = RawConn(node.port)
        c.send(post_answer({"prompt": unique("gone")}))
        c.close()
    time.sleep(0.5)  # the 202s are written to closed sockets meanwhile
    healthz_ok(node.port)


@pytest.mark.parametrize("partial", [
    b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Le",
    b'POST /answer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": "rst',
], ids=["mid-headers", "mid-body"])
def test_client_resets_mid_request(node, partial):
    c = RawConn(node.port)
    c.send(partial)
    time.sleep(0.1)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    time.sleep(0.2)
    healthz_ok(node.port)


def test_long_poll_client_disconnects(node):
    prompt = unique("longpoll") + " [[latency=1500]]"
    with RawConn(node.port) as c:
        cid = assert_accepted(c.request(post_answer({"prompt": prompt})))
    q = urllib.parse.urlencode({"conversationId": cid, "wait": 5})
    c = RawConn(node.port)
    c.send(b"GET /polling?%s HTTP/1.1\r\nHost: x\r\n\r\n" % q.encode())
    time.sleep(0.5)
    c.close()
    healthz_ok(node.port)
    # The turn completes after the client left: the server wakes the abandoned poll and keeps serving.
    done = node.wait_done(cid)
    assert done["status"] == "complete", done
    healthz_ok(node.port)


# ------------------------------------------------------------------------------------------------
# 13. Server-Sent Events
# ------------------------------------------------------------------------------------------------


def parse_sse(text):
    """[(event name, data as JSON)] of an SSE body; comments (": keep-alive") are skipped."""
    events = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            assert colon, f"bad SSE line {line!r}"
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if not fields:
            continue
        assert "event" in fields and "data" in fields, f"SSE event without event: or data: {block!r}"
        events.append((fields["event"][0], json.loads("\n".join(fields["data"]))))
    return events


def create_stream_request(prompt):
    body = json.dumps({"model": "fake", "input": prompt, "stream": True, "background": True}).encode()
    return (b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def assert_sse_head(r):
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/event-stream"), r
    assert r.tokens("transfer-encoding") == ["chunked"], f"an HTTP/1.1 stream that is not chunked: {r!r}"
    assert "content-length" not in r.headers, r


def assert_whole_stream(r, prompt):
    events = parse_sse(r.body.decode("utf-8"))
    assert events, r
    types = [e[0] for e in events]
    for name, data in events:
        assert data.get("type") == name, (name, data)
    seqs = [d["sequence_number"] for _, d in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"sequence numbers not consecutive: {seqs}"
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    final = events[-1][1]["response"]
    assert final["status"] == "completed", final
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == llm_answer(prompt), (text, types)
    return events


def test_sse_stream_is_chunked_and_ends_with_the_terminal_event(node):
    prompt = unique("sse") + " one two three"
    with RawConn(node.port, timeout=30) as c:
        c.send(create_stream_request(prompt))
        r = c.read_head()
        assert_sse_head(r)
        c.read_body(r)  # to the zero chunk
        events = assert_whole_stream(r, prompt)
        rid = events[0][1]["response"]["id"]
        assert_healthz(c.request(HEALTHZ))  # the connection goes on after the zero chunk and its empty trailer
    # The stored stream, replayed by GET.
    with RawConn(node.port, timeout=30) as c:
        c.send(b"GET /v1/responses/%s?stream=true HTTP/1.1\r\nHost: x\r\n\r\n" % rid.encode())
        again = c.read_response()
        assert_sse_head(again)
        replay = assert_whole_stream(again, prompt)
        assert [(n, d["sequence_number"]) for n, d in replay] == [(n, d["sequence_number"]) for n, d in events]
        assert_healthz(c.request(HEALTHZ))
        c.assert_quiet(0.1)


def test_sse_client_disconnects_mid_stream(node):
    prompt = unique("sse-drop") + " " + " ".join(f"w{i}" for i in range(20)) + " [[latency=2000]]"
    c = RawConn(node.port, timeout=10)
    c.send(create_stream_request(prompt))
    r = c.read_head()
    assert_sse_head(r)
    first = c.read_chunk()
    assert first.startswith(b"event: "), first
    c.close()
    healthz_ok(node.port)
    time.sleep(2.2)  # the worker finishes the response; the server has no client left to write to
    healthz_ok(node.port)


# ------------------------------------------------------------------------------------------------
# 14. Out of file descriptors
# ------------------------------------------------------------------------------------------------


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_pauses_accepting_without_spinning(cluster):
    """With its descriptor limit reached, accept(2) fails and the connection stays queued: the listener is
    readable again at once. The server pauses accepting (100 ms at a time) instead of spinning, warns, and serves
    new connections once descriptors are free again."""
    n = start_on_own_port(cluster, "api")
    pid = n.proc.pid
    healthz_ok(n.port)
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds + 16, open_fds + 16))
    held = []
    try:
        for _ in range(60):  # the kernel completes these handshakes from the backlog, accepted or not
            s = socket.create_connection(("127.0.0.1", n.port), timeout=5)
            held.append(s)
        time.sleep(0.5)
        before = cpu_seconds(pid)
        time.sleep(2.0)
        used = cpu_seconds(pid) - before
        assert used < 0.5, f"the server used {used:.2f} s of CPU in 2 s with its descriptors exhausted (spinning?)"
        assert "cannot accept connections" in n.proc.log(), n.proc.log()[-2000:]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the held connections are closed by their clients; the server frees them and accepts again
        try:
            healthz_ok(n.port)
            break
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
