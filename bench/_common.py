"""Helpers shared by the benchmarks in bench/ (not a benchmark itself).

Polish test content, temporary configs, free ports, the shared counting sink
(``../shared/tools/smtp_sink.py``) as a subprocess, and small formatting
helpers.  Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from email.header import Header
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("LISTSERV_SHARED", ROOT.parent / "shared"))
SINK = SHARED / "tools" / "smtp_sink.py"
DOMAIN = "lists.example.org"
CRLF = "\r\n"

# -- Polish content ------------------------------------------------------------------

SENTENCES = [
    "Gmina przygotowuje aktualizację Planu działań na rzecz zrównoważonej energii i klimatu.",
    "Inwentaryzacja emisji bazowej obejmuje budynki użyteczności publicznej, oświetlenie uliczne i transport.",
    "Proszę o przesłanie danych o zużyciu ciepła sieciowego za ubiegły rok do końca przyszłego tygodnia.",
    "Termomodernizacja szkoły podstawowej w Łęcznej zmniejszyła zużycie energii o czterdzieści procent.",
    "Czy ktoś z Państwa korzystał już z programu „Ciepłe Mieszkanie” w gminie wiejskiej?",
    "Na spotkaniu w Żyrardowie omówiliśmy harmonogram wymiany źródeł ciepła w budynkach komunalnych.",
    "Wojewódzki fundusz ochrony środowiska ogłosił nabór wniosków na fotowoltaikę dla jednostek samorządu.",
    "Załączam notatkę ze spotkania zespołu roboczego oraz zestawienie wskaźników monitoringu.",
    "Zarząd województwa zatwierdził zmiany w regionalnym programie operacyjnym dotyczące efektywności energetycznej.",
    "Przypominam, że sprawozdanie z realizacji działań należy złożyć w ciągu dwóch lat od przyjęcia planu.",
    "Audyt energetyczny ratusza wykazał, że największe straty ciepła występują przez nieszczelne okna.",
    "Źródła finansowania: NFOŚiGW, fundusze europejskie, mechanizm ELENA oraz partnerstwo publiczno-prywatne.",
    "Mieszkańcy zgłaszają, że nowe oprawy LED oświetlają jezdnię jaśniej niż dotychczasowe lampy sodowe.",
    "Dziękuję za szybką odpowiedź — przekażę informację kierownikowi wydziału gospodarki komunalnej.",
    "W załączniku przesyłam poprawioną wersję tabeli z celami redukcji emisji dwutlenku węgla do 2030 roku.",
    "Pozdrawiam serdecznie i życzę owocnej dyskusji na forum listy.",
]

FIRST = ["Paweł", "Małgorzata", "Łukasz", "Agnieszka", "Grzegorz", "Żaneta", "Józef", "Elżbieta", "Michał",
         "Katarzyna", "Wojciech", "Dorota", "Przemysław", "Bożena", "Zdzisław", "Jadwiga", "Mirosław", "Halina",
         "Jarosław", "Urszula", "Tomasz", "Beata", "Krzysztof", "Ewa", "Andrzej", "Anna", "Piotr", "Zofia"]
LAST = ["Nowak", "Kowalski", "Wiśniewski", "Wójcik", "Kowalczyk", "Kamiński", "Lewandowski", "Zieliński",
        "Szymański", "Woźniak", "Dąbrowski", "Kozłowski", "Jankowski", "Mazur", "Kwiatkowski", "Krawczyk",
        "Piotrowski", "Grabowski", "Nowakowski", "Pawłowski", "Michalski", "Nowicki", "Adamczyk", "Dudek",
        "Zając", "Wieczorek", "Jabłoński", "Król", "Majewski", "Olszewski", "Jaworski", "Wróbel", "Małecki",
        "Stępień", "Górski", "Rutkowski", "Michalak", "Sikora", "Ostrowski", "Baran", "Duda", "Szewczyk"]
ORGS = ["Urząd Miasta Łodzi", "Gmina Żabia Wola", "Starostwo Powiatowe w Łęcznej", "Urząd Gminy Ścinawa",
        "Związek Gmin Śląskich", "Miejski Zarząd Budynków w Gdańsku", "Urząd Marszałkowski Województwa Łódzkiego",
        "Gmina Miejska Świętochłowice", "Agencja Poszanowania Energii", "Urząd Miasta Wrocławia",
        "Gmina Kórnik", "Fundacja na rzecz Efektywnego Wykorzystania Energii", "Urząd Gminy Nowa Dęba",
        "Zakład Gospodarki Komunalnej w Żywcu", "Miasto Stołeczne Warszawa", "Gmina Wieliczka",
        "Politechnika Łódzka", "Regionalna Agencja Energetyczna w Białymstoku", "Gmina Zgierz"]

_ASCII = str.maketrans("ąćęłńóśźżĄĆĘŁŃÓŚŹŻ", "acelnoszzACELNOSZZ")


def ascii_fold(text: str) -> str:
    return text.translate(_ASCII).lower()


def polish_text(rng: random.Random, size: int) -> str:
    """Paragraphs of Polish prose, about `size` bytes in UTF-8."""
    lines: list[str] = []
    total = 0
    while total < size:
        paragraph = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 4)))
        # wrap at ~72 characters
        line = ""
        for word in paragraph.split():
            if len(line) + len(word) + 1 > 72:
                lines.append(line)
                total += len(line.encode()) + 2
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        lines.append("")
        total += len(line.encode()) + 4
    return "\r\n".join(lines)


def make_post(rng: random.Random, *, author: str, author_name: str, list_address: str, size: int,
              message_id: str, subject: str = "Planowanie działań: termomodernizacja i źródła ciepła") -> bytes:
    """One member post as an MUA would send it: UTF-8 8bit body, RFC 2047 encoded headers."""
    body = polish_text(rng, size - 600)
    head = (
        f"From: {Header(author_name, 'utf-8').encode(linesep=CRLF)} <{author}>\r\n"
        f"To: {list_address}\r\n"
        f"Subject: {Header(subject, 'utf-8').encode(linesep=CRLF)}\r\n"
        f"Date: Tue, 14 Nov 2023 22:13:20 +0100\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "User-Agent: Mozilla Thunderbird\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body.encode("utf-8") + b"\r\n"


def member_address(i: int) -> str:
    return f"czlonek{i:05d}@gmina{i % 97:02d}.example.pl"


# -- processes, ports, configs ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def config_mapping(state: Path, *, listen_port: int, relay_port: int | None, log_level: str = "warning",
                   max_recipients: int = 500, connections: int = 4) -> dict[str, Any]:
    return {
        "server": {"domain": DOMAIN, "listen": f"127.0.0.1:{listen_port}", "state_dir": str(state / "state"),
                   "log_level": log_level},
        "delivery": {"mode": "smtp" if relay_port else "maildir", "relay": f"127.0.0.1:{relay_port or 25}",
                     "max_recipients": max_recipients, "connections": connections, "timeout": 60},
        "dkim": {"selector": "listserv", "private_key": str(state / "dkim.key")},
        "archive": {"dir": str(state / "archive"), "base_url": "https://archiwum.example.org/"},
    }


def to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML for config_mapping() output (tables of str/int/bool)."""
    out = []
    for table, values in data.items():
        out.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, bool):
                out.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int):
                out.append(f"{key} = {value}")
            else:
                out.append(f"{key} = {json.dumps(str(value), ensure_ascii=False)}")
        out.append("")
    return "\n".join(out)


class Sink:
    """The shared counting sink (../shared/tools/smtp_sink.py) in its own process."""

    def __init__(self, workdir: Path, expect: int = 0) -> None:
        if not SINK.exists():
            raise SystemExit(f"{SINK} not found (set LISTSERV_SHARED)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = workdir / "sink.port"
        self.counts_file = workdir / "sink.counts.json"
        self.done_file = workdir / "sink.done.json"
        args = [sys.executable, str(SINK), "--host", "127.0.0.1", "--port", "0", "--port-file", str(self.port_file),
                "--counts-file", str(self.counts_file), "--lifetime", "600"]
        if expect:
            args += ["--expect", str(expect), "--done-file", str(self.done_file)]
        self.log = open(workdir / "sink.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sink did not start; see " + str(workdir / "sink.log"))
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        wait_port(self.port, proc=self.proc)

    def counts(self) -> dict[str, Any]:
        try:
            return json.loads(self.counts_file.read_text())
        except (OSError, ValueError):
            return {}

    def done(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.done_file.read_text())
        except (OSError, ValueError):
            return None

    def wait_done(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.done()
            if done is not None:
                return done
            time.sleep(0.01)
        raise TimeoutError(f"the sink did not reach its expected count; counts: {self.counts()}")

    def reset(self) -> None:
        """Zero the counters (SIGUSR2) and wait until the sink has done it."""
        before = self.counts().get("now_ts", 0)
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            c = self.counts()
            if c.get("now_ts", 0) > before and c.get("recipients") == 0 and not self.done_file.exists():
                return
            time.sleep(0.01)
        raise TimeoutError("the sink did not reset")

    def cpu_seconds(self) -> float:
        """User+system CPU of the sink process so far (from /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class DnsStub:
    """A tiny authoritative DNS server on 127.0.0.1 (UDP, a thread of this process).

    listserv checks SPF/DKIM/DMARC of arriving mail through DNS; a benchmark must not
    ask the outside world (and a sandbox without DNS would make every post wait for a
    timeout).  ``records`` maps (name, type) to TXT strings; every other question is
    answered NXDOMAIN at once.  ``queries`` counts the questions.
    """

    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None) -> None:
        import threading

        self.records = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in (records or {}).items()}
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._stop = False
        self.thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - not DNS: ignore
                continue
            self.queries += 1
            response = dns.message.make_response(query)
            response.flags |= 0x0400  # AA
            question = query.question[0]
            name = question.name.to_text().lower().rstrip(".")
            texts = self.records.get((name, dns.rdatatype.to_text(question.rdtype)))
            if texts is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                quoted = ['"' + t.replace('"', '\\"') + '"' for t in texts]
                response.answer.append(dns.rrset.from_text(question.name, 300, "IN", question.rdtype, *quoted))
            try:
                self.sock.sendto(response.to_wire(), addr)
            except OSError:
                return

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_line() -> str:
    """The load average, with a warning when other work shares the machine (it skews every figure)."""
    one, five, _ = os.getloadavg()
    cpus = os.cpu_count() or 1
    warn = "  WARNING: other processes are busy on this machine; figures are noisy" if one > 0.75 * cpus else ""
    return f"load average: {one:.2f} (1 min), {five:.2f} (5 min) on {cpus} CPUs{warn}"


def machine_line() -> str:
    import platform

    return (f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()} on {platform.system()} "
            f"{platform.release()}")
