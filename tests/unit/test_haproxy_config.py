"""zfast.routing.haproxy without a running haproxy: the rendered configuration passes
`haproxy -c`, map and crt-list contents, and bad input refused with a clear HAProxyError."""

from __future__ import annotations

import shutil

import pytest

from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.instance import HAProxy
from zfast.routing.haproxy.model import Route, Upstream, validate
from zfast.routing.haproxy.pem import make_self_signed, normalize_pem
from zfast.routing.haproxy.render import render_maps
from zfast.routing.haproxy.runtime import parse_stat_csv

HTTP_CHECK = {"kind": "http", "interval_ms": 250, "fall": 2, "rise": 3, "path": "/healthz"}
TCP_CHECK = {"kind": "tcp", "interval_ms": 1000, "fall": 3, "rise": 2}


@pytest.fixture(scope="module", autouse=True)
def _need_haproxy():
    # Fail, never skip: a run without haproxy must not look like a green one.
    assert shutil.which("haproxy"), "haproxy not installed (apt-get install haproxy)"


@pytest.fixture(scope="module")
def pems():
    return {
        "app.example.org": make_self_signed("app.example.org", ["app.example.org"]),
        "*.wild.example.org": make_self_signed("*.wild.example.org", ["*.wild.example.org"]),
    }


def upstreams():
    return [
        Upstream("app_8080", (("10.0.0.2", 8080), ("10.0.0.3", 8080)), HTTP_CHECK),
        Upstream("v6_80", (("fd00::5", 80), ("2001:db8::1", 8080)), TCP_CHECK),
        Upstream("plain", (("192.0.2.7", 9000),)),
        Upstream("empty", ()),
    ]


def routes():
    return [
        Route("app.example.org", "app_8080"),
        Route("Secure.Example.org", "app_8080", redirect_https=True),
        Route("*.wild.example.org", "v6_80"),
        Route("special.wild.example.org", "plain"),
        Route("*.redir.example.org", "plain", redirect_https=True),
    ]


@pytest.mark.parametrize("with_certs", [False, True], ids=["no-certs", "certs"])
def test_rendered_config_passes_haproxy_check(tmp_path, pems, with_certs):
    h = HAProxy(tmp_path / "hap")
    h.write_files(routes(), upstreams(), pems if with_certs else {}, "A" * 43)
    h.check_config()                                    # raises with haproxy's message
    cfg = h.workdir.cfg.read_text()
    w = h.workdir.path
    assert f"stats socket {w}/api.sock mode 600 level admin expose-fd listeners" in cfg
    assert "bind 0.0.0.0:80\n" in cfg and "bind [::]:80 v6only\n" in cfg
    assert (f"bind [::]:443 v6only ssl crt {w}/default.pem crt-list {w}/certs.list "
            "alpn h2,http/1.1") in cfg
    assert "option httpchk GET /healthz" in cfg
    assert "default-server check inter 250ms fall 2 rise 3" in cfg
    assert "default-server check inter 1000ms fall 3 rise 2" in cfg
    assert "server fd00::5_80 [fd00::5]:80" in cfg and "server 2001:db8::1_8080 [2001:db8::1]:8080" in cfg
    assert "timeout tunnel" in cfg and "option idle-close-on-response" in cfg
    assert "    user haproxy\n" in cfg                   # workers do not run as root
    backend_plain = cfg.split("backend plain\n")[1].split("\n\n")[0]
    assert "check" not in backend_plain                  # no health settings: no checks
    listed = h.workdir.crt_list.read_text()
    if with_certs:
        assert listed == (f"{w}/certs/_wildcard.wild.example.org.pem *.wild.example.org\n"
                          f"{w}/certs/app.example.org.pem app.example.org\n")
        assert (w / "certs/app.example.org.pem").read_text() == normalize_pem(pems["app.example.org"])
        assert (w / "certs/app.example.org.pem").stat().st_mode & 0o077 == 0
    else:
        assert listed == "" and not list((w / "certs").iterdir())
    assert "PRIVATE KEY" in h.workdir.default_cert.read_text()


def test_default_cert_is_made_once(tmp_path):
    h = HAProxy(tmp_path)
    h.write_files([], [])
    first = h.workdir.default_cert.read_text()
    h.write_files([], [])
    assert h.workdir.default_cert.read_text() == first
    h.check_config()


def test_map_files(tmp_path):
    h = HAProxy(tmp_path)
    h.write_files(routes(), upstreams(), {}, "thumb-Print_0123456789abcdef")
    assert (tmp_path / "hosts.map").read_text() == (
        "app.example.org app_8080\n"
        "secure.example.org app_8080:redirect\n"
        "special.wild.example.org plain\n")
    # the request's host without its first label, leading dot kept
    assert (tmp_path / "wildcards.map").read_text() == (
        ".redir.example.org plain:redirect\n"
        ".wild.example.org v6_80\n")
    assert (tmp_path / "acme.map").read_text() == "thumbprint thumb-Print_0123456789abcdef\n"
    h.write_files(routes()[:1], upstreams())
    assert (tmp_path / "acme.map").read_text() == ""           # no thumbprint: no answers
    assert (tmp_path / "wildcards.map").read_text() == ""


def test_render_maps_is_pure():
    st = validate([Route("*.a.example.org", "u"), Route("b.example.org", "u", True)],
                  [Upstream("u", (("10.0.0.1", 80),))])
    assert render_maps(st.routes) == {
        "hosts.map": "b.example.org u:redirect\n",
        "wildcards.map": ".a.example.org u\n",
        "acme.map": "",
    }


def test_redirect_keeps_a_non_default_https_port(tmp_path):
    h = HAProxy(tmp_path, http_port=8080, https_port=8443)
    h.write_files(routes(), upstreams())
    h.check_config()
    cfg = h.workdir.cfg.read_text()
    assert "redirect location https://%[var(txn.host)]:8443%[pathq] code 301" in cfg
    assert "bind 0.0.0.0:8080\n" in cfg


@pytest.mark.parametrize("ups,rts,message", [
    ([Upstream("my app", (("10.0.0.1", 80),))], [], "bad upstream name 'my app'"),
    ([Upstream("", (("10.0.0.1", 80),))], [], "bad upstream name ''"),
    ([Upstream("fe_http", ())], [], "bad upstream name 'fe_http'"),
    ([Upstream("a", ())], [Route("x.example.org", "b")], "route x.example.org: unknown upstream 'b'"),
    ([Upstream("a", ()), Upstream("a", ())], [], "upstream 'a' defined twice"),
    ([Upstream("a", (("10.0.0.1", 80), ("10.0.0.1", 80)))], [], "listed twice"),
    ([Upstream("a", (("not-an-ip", 80),))], [], "bad server"),
    ([Upstream("a", (("10.0.0.1", 0),))], [], "bad port"),
    ([Upstream("a", (), {"kind": "udp"})], [], "health kind"),
    ([Upstream("a", (), {"kind": "http", "path": "/a b"})], [], "bad health path"),
    ([Upstream("a", (), {"kind": "http", "path": "/x#y"})], [], "bad health path"),
    ([Upstream("a", (), {"kind": "tcp", "interval_ms": 0})], [], "interval_ms"),
    ([Upstream("a", (), {"kind": "tcp", "path": "/"})], [], "for http health checks only"),
    ([Upstream("a", ())], [Route("bad host.example.org", "a")], "bad host name"),
    ([Upstream("a", ())], [Route("*.*.example.org", "a")], "bad host name"),
    ([Upstream("a", ())], [Route("x.example.org", "a"), Route("X.example.org.", "a")], "defined twice"),
])
def test_bad_input_refused(tmp_path, ups, rts, message):
    h = HAProxy(tmp_path)
    with pytest.raises(HAProxyError) as e:
        h.write_files(rts, ups)
    assert message in str(e.value)
    assert not h.workdir.cfg.exists()                     # nothing written from bad input


def test_bad_certificates_and_thumbprint(tmp_path, pems):
    ups, rts = [Upstream("a", ())], []
    h = HAProxy(tmp_path)
    a, b = pems["app.example.org"], pems["*.wild.example.org"]
    cert_a = a[:a.index("-----BEGIN PRIVATE KEY")]
    key_b = b[b.index("-----BEGIN PRIVATE KEY"):]
    for bundle, message in ((cert_a, "exactly one PRIVATE KEY"),
                            (cert_a + key_b, "does not belong"),
                            ("junk", "no CERTIFICATE")):
        with pytest.raises(HAProxyError, match=message):
            h.write_files(rts, ups, {"app.example.org": bundle})
    with pytest.raises(HAProxyError, match="bad host name"):
        h.write_files(rts, ups, {"not a host": a})
    with pytest.raises(HAProxyError, match="thumbprint"):
        h.write_files(rts, ups, {}, "has spaces in it, not base64url")


def test_normalize_pem_drops_blank_lines_and_crlf(pems):
    pem = pems["app.example.org"]
    messy = "junk before\r\n" + pem.replace("\n", "\r\n").replace("-----\r\n-----", "-----\r\n\r\n-----")
    out = normalize_pem(messy)
    assert out == normalize_pem(pem)
    assert "\n\n" not in out and "\r" not in out and out.endswith("-----\n")


def test_haproxy_message_on_a_refused_configuration(tmp_path):
    class Broken(HAProxy):
        def render_config(self, upstreams):
            return super().render_config(upstreams) + "\n    no-such-keyword 1\n"

    h = Broken(tmp_path)
    with pytest.raises(HAProxyError) as e:
        h.start([], [Upstream("a", (("10.0.0.1", 80),))])
    assert "haproxy refused the configuration" in str(e.value)
    assert "no-such-keyword" in str(e.value)          # haproxy's own words
    assert not h.alive() and h.pid() is None


def test_constructor_checks(tmp_path):
    with pytest.raises(HAProxyError, match="workdir"):
        HAProxy(tmp_path / "with space")
    with pytest.raises(HAProxyError, match="too long for unix sockets"):
        HAProxy(tmp_path / ("d" * 100))
    with pytest.raises(HAProxyError, match="bind address"):
        HAProxy(tmp_path, binds=["localhost"])
    with pytest.raises(HAProxyError, match="must differ"):
        HAProxy(tmp_path, http_port=80, https_port=80)
    with pytest.raises(HAProxyError, match="does not exist"):
        HAProxy(tmp_path, user="no-such-user-here")
    h = HAProxy(tmp_path, user=None)
    h.write_files([], [])
    assert "user " not in h.workdir.cfg.read_text()
    h = HAProxy(tmp_path, haproxy_bin="no-such-haproxy-binary")
    h.write_files([], [])
    with pytest.raises(HAProxyError, match="not found"):
        h.check_config()
    with pytest.raises(HAProxyError, match="not running"):
        h.update([], [])
    h.stop()                                           # idempotent, nothing to stop


STAT_COLUMNS = (
    "pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,"
    "status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,"
    "tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,"
    "hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,"
    "srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,"
    "ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,"
    "check_health,agent_rise,agent_fall,agent_health,addr").split(",")


def _stat_line(**values) -> str:
    return ",".join(str(values.get(c, "")) for c in STAT_COLUMNS) + ","


def test_parse_show_stat():
    text = "\n".join([
        "# " + ",".join(STAT_COLUMNS) + ",",
        _stat_line(pxname="fe_http", svname="FRONTEND", scur=1, stot=7, bin=700, bout=1400,
                   status="OPEN", type=0, req_tot=7),
        _stat_line(pxname="app", svname="10.0.0.2_8080", stot=5, bin=500, bout=1000, status="DOWN",
                   type=2, check_status="* L7STS", hrsp_5xx=1, last_chk="HTTP status check returned",
                   addr="10.0.0.2:8080"),
        _stat_line(pxname="app", svname="BACKEND", stot=5, status="DOWN", type=1, req_tot=6),
    ]) + "\n\n"
    fe, srv, be = parse_stat_csv(text)
    assert fe["type"] == "frontend" and fe["status"] == "OPEN" and fe["current_sessions"] == 1
    assert (fe["requests"], fe["sessions"], fe["bytes_in"], fe["bytes_out"]) == (7, 7, 700, 1400)
    assert srv["type"] == "server" and srv["proxy"] == "app" and srv["name"] == "10.0.0.2_8080"
    assert srv["status"] == "DOWN" and srv["check_status"] == "L7STS"
    assert srv["check_desc"] == "HTTP status check returned" and srv["responses_5xx"] == 1
    assert srv["requests"] == 5 and srv["address"] == "10.0.0.2:8080"
    assert be["type"] == "backend" and be["requests"] == 6
    with pytest.raises(HAProxyError):
        parse_stat_csv("Unknown command\n")
