import base64, quopri
def w(name, data):
    if isinstance(data, str):
        data = data.encode('utf-8')
    open(name, 'wb').write(data.replace(b'\n', b'\r\n'))
body = "Dzień dobry,\n\nZażółć gęślą jaźń. Łódź, Kraków, Gdańsk - źródło ciepła.\nWięcej: https://gmina.example.pl/seap?id=7&x=1.\nProszę pisać na adres jan.kowalski@gmina.example.pl.\n\n> Czy ktoś ma dane o zużyciu energii?\n> Pytam, bo termin mija.\n\nPozdrawiam\nJan\n"
subj = "Termomodernizacja szkoły w Łodzi"
w('pl_iso8859_2.eml', b"""From: =?iso-8859-2?Q?Pawe=B3_Wi=B6niewski?= <pawel.wisniewski@gmina-a.example.pl>
To: seap-planning@lists.example.org
Subject: =?iso-8859-2?Q?Termomodernizacja_szko=B3y_w_=A3odzi?=
Date: Tue, 14 May 2024 10:15:00 +0200
Message-ID: <latin2.1@gmina-a.example.pl>
MIME-Version: 1.0
Content-Type: text/plain; charset=iso-8859-2
Content-Transfer-Encoding: quoted-printable

""" + quopri.encodestring(body.encode('iso-8859-2')))
w('pl_cp1250.eml', b"""From: =?windows-1250?B?""" + base64.b64encode("Małgorzata Żak".encode('cp1250')) + b"""?= <m.zak@urzad.example.pl>
To: seap-planning@lists.example.org
Subject: =?windows-1250?B?""" + base64.b64encode(("Re: " + subj).encode('cp1250')) + b"""?=
Date: Tue, 14 May 2024 12:00:00 +0200
Message-ID: <cp1250.2@urzad.example.pl>
In-Reply-To: <latin2.1@gmina-a.example.pl>
References: <latin2.1@gmina-a.example.pl>
MIME-Version: 1.0
Content-Type: text/plain; charset=windows-1250
Content-Transfer-Encoding: base64

""" + base64.encodebytes("Odpowiedź: świetnie, że Łódź ma już audyt. Ścinawa też.\n".encode('cp1250')))
w('pl_utf8.eml', """From: Grzegorz Brzęczyszczykiewicz <g.b@example.net>
To: seap-planning@lists.example.org
Subject: Re: Termomodernizacja szkoły w Łodzi
Date: Wed, 15 May 2024 08:30:00 +0200
Message-ID: <utf8.3@example.net>
In-Reply-To: <cp1250.2@urzad.example.pl>
References: <latin2.1@gmina-a.example.pl> <cp1250.2@urzad.example.pl>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Gżegżółka i źdźbło: wszystko działa w UTF-8.
""")
w('pl_raw8bit.eml', """From: Józef Dąbrowski <jozef@example.org>
To: seap-planning@lists.example.org
Subject: Spotkanie w Żyrardowie
Date: Thu, 16 May 2024 09:00:00 +0200
Message-ID: <raw8bit.4@example.org>

Zebranie zespołu w Żyrardowie, sala nr 5. Proszę o potwierdzenie.
""".encode('iso-8859-2'))
w('koi8r.eml', b"""From: =?koi8-r?B?""" + base64.b64encode("Иван Петров".encode('koi8-r')) + b"""?= <ivan@example.ru>
Subject: =?koi8-r?B?""" + base64.b64encode("Привет из Москвы".encode('koi8-r')) + b"""?=
Date: Fri, 17 May 2024 09:00:00 +0300
Message-ID: <koi8.5@example.ru>
MIME-Version: 1.0
Content-Type: text/plain; charset=koi8-r
Content-Transfer-Encoding: 8bit

""" + "Съешь же ещё этих мягких французских булок.\n".encode('koi8-r'))
w('iso2022jp.eml', b"""From: =?iso-2022-jp?B?""" + base64.b64encode("山田太郎".encode('iso-2022-jp')) + b"""?= <yamada@example.jp>
Subject: =?iso-2022-jp?B?""" + base64.b64encode("会議の件".encode('iso-2022-jp')) + b"""?=
Date: Fri, 17 May 2024 10:00:00 +0900
Message-ID: <jp.6@example.jp>
MIME-Version: 1.0
Content-Type: text/plain; charset=iso-2022-jp
Content-Transfer-Encoding: 7bit

""" + "明日の会議は十時からです。\n".encode('iso-2022-jp'))
w('hostile_subject.eml', """From: "<script>alert('from')</script>" <evil@attacker.example>
To: seap-planning@lists.example.org
Subject: <script>alert('subject')</script><img src=x onerror=alert(1)>
Date: Sat, 18 May 2024 10:00:00 +0200
Message-ID: <hostile.7@attacker.example>
Content-Type: text/plain; charset=utf-8

Click javascript:alert('body') or <a href="javascript:alert(2)">this</a>.
</pre><script>alert('pre')</script>
See http://example.org/"><script>alert(3)</script>
""")
w('hostile_html.eml', """From: Mallory <mallory@attacker.example>
To: seap-planning@lists.example.org
Subject: HTML-only
Date: Sat, 18 May 2024 11:00:00 +0200
Message-ID: <hostile.8@attacker.example>
MIME-Version: 1.0
Content-Type: text/html; charset=utf-8

<html><head><style>body{display:none}</style><script>alert('head')</script></head>
<body onload="alert('onload')"><p onclick="alert('click')">Zaproszenie na <b>szkolenie</b> w Łodzi.</p>
<a href="javascript:alert('href')">kliknij</a> <a href="https://example.org/ok">strona</a>
<a href="mailto:secret.person@hidden.example.org">napisz</a>
<img src="https://tracker.example/pixel.gif" onerror="alert('img')">
<iframe src="https://evil.example/"></iframe><svg onload="alert('svg')"><circle r="5"/></svg>
<form action="https://evil.example/"><input name="q"></form>
<div style="position:fixed;top:0">tekst</div>
<table><tr><td>AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA</td></tr></table>
</body></html>
""")
w('hostile_attachments.eml', """From: Mallory <mallory@attacker.example>
To: seap-planning@lists.example.org
Subject: Attachments
Date: Sat, 18 May 2024 12:00:00 +0200
Message-ID: <hostile.9@attacker.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="XX"

--XX
Content-Type: text/plain; charset=utf-8

W załączniku plan.
--XX
Content-Type: text/html; name="../../x.html"
Content-Disposition: attachment; filename="../../x.html"

<script>alert('attachment')</script>
--XX
Content-Type: image/svg+xml
Content-Disposition: attachment; filename="logo.svg"

<svg xmlns="http://www.w3.org/2000/svg" onload="alert('svg')"/>
--XX
Content-Type: application/pdf
Content-Disposition: attachment; filename*=utf-8''za%C5%BC%C3%B3%C5%82%C4%87%20plan.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcfsj6IK
--XX
Content-Type: application/octet-stream
Content-Disposition: attachment; filename="..\\\\..\\\\windows.ini"

x
--XX--
""")
w('no_archive.eml', """From: Private <p@example.org>
Subject: do not archive
Date: Sat, 18 May 2024 12:00:00 +0200
Message-ID: <noarch.10@example.org>
X-No-Archive: yes

secret
""")
