"""The schema: ``MIGRATIONS[i]`` takes the database from version i to i+1."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the core pipeline.
    """
    CREATE TABLE lists (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        settings    TEXT NOT NULL DEFAULT '{}',   -- JSON: this list's overrides
        created_at  REAL NOT NULL
    );
    CREATE TABLE members (
        id            INTEGER PRIMARY KEY,
        list_id       INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
        address       TEXT NOT NULL,
        display_name  TEXT NOT NULL DEFAULT '',
        organisation  TEXT NOT NULL DEFAULT '',
        role          TEXT NOT NULL DEFAULT 'member',   -- member | moderator | owner
        moderated     INTEGER NOT NULL DEFAULT 0,
        delivery      TEXT NOT NULL DEFAULT 'enabled',  -- enabled | disabled | nomail
        created_at    REAL NOT NULL,
        UNIQUE (list_id, address)
    );
    CREATE INDEX members_by_address ON members(address);
    CREATE TABLE bans (
        id          INTEGER PRIMARY KEY,
        list_id     INTEGER NOT NULL DEFAULT 0,  -- 0: site-wide
        pattern     TEXT NOT NULL,
        created_at  REAL NOT NULL,
        UNIQUE (list_id, pattern)
    );
    CREATE TABLE incoming (
        id           INTEGER PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        kind         TEXT NOT NULL,   -- post | request | join | leave | confirm | owner | bounces
        detail       TEXT NOT NULL DEFAULT '',  -- the +suffix of the address (token, VERP)
        mail_from    TEXT NOT NULL,
        rcpt         TEXT NOT NULL,
        peer         TEXT NOT NULL DEFAULT '',
        received_at  REAL NOT NULL,
        message_id   TEXT NOT NULL DEFAULT '',
        sender       TEXT NOT NULL DEFAULT '',
        subject      TEXT NOT NULL DEFAULT '',
        status       TEXT NOT NULL,
        reason       TEXT NOT NULL DEFAULT '',
        notified     INTEGER NOT NULL DEFAULT 0,
        updated_at   REAL NOT NULL,
        data         BLOB NOT NULL
    );
    CREATE INDEX incoming_by_status ON incoming(status, id);
    CREATE TABLE outbox (
        id             INTEGER PRIMARY KEY,
        list_id        INTEGER NOT NULL,
        incoming_id    INTEGER,          -- the post or owner mail this copy is for
        kind           TEXT NOT NULL,    -- post | owner | notice
        envelope_from  TEXT NOT NULL,
        created_at     REAL NOT NULL,
        data           BLOB NOT NULL
    );
    CREATE TABLE deliveries (
        id               INTEGER PRIMARY KEY,
        outbox_id        INTEGER NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
        recipient        TEXT NOT NULL,
        status           TEXT NOT NULL DEFAULT 'pending',  -- pending | sent | failed
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_reply       TEXT NOT NULL DEFAULT '',
        updated_at       REAL NOT NULL
    );
    CREATE INDEX deliveries_pending ON deliveries(outbox_id, id) WHERE status = 'pending';
    CREATE INDEX deliveries_by_outbox ON deliveries(outbox_id, status);
    """,
    # 1 -> 2: remember which of the config's [[lists]] were created, so a list
    # the administrator removed is not brought back at the next start.
    """
    CREATE TABLE seeded_lists (
        name        TEXT PRIMARY KEY,
        created_at  REAL NOT NULL
    );
    INSERT INTO seeded_lists (name, created_at) SELECT name, created_at FROM lists;
    """,
    # 2 -> 3: the archive's source of truth (the archive stage renders from
    # it; posts as distributed, before the per-copy signature), and what the
    # e-mail commands need: tokens, the consent record, reply rate limits.
    """
    CREATE TABLE archive (
        id           INTEGER PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        message_id   TEXT NOT NULL,
        msgid_hash   TEXT NOT NULL,     -- base32(sha1(Message-ID)), the URL key
        received_at  REAL NOT NULL,
        source       TEXT NOT NULL,     -- post | import
        removed      INTEGER NOT NULL DEFAULT 0,
        data         BLOB NOT NULL,
        UNIQUE (list_id, msgid_hash)
    );
    CREATE TABLE tokens (
        token        TEXT PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        address      TEXT NOT NULL,
        action       TEXT NOT NULL,     -- join | leave | moderate
        payload      TEXT NOT NULL DEFAULT '{}',
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        used_at      REAL,
        used_by      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tokens_by_address ON tokens(address, list_id, action);
    CREATE TABLE consent_events (
        id         INTEGER PRIMARY KEY,
        list_name  TEXT NOT NULL,       -- kept by name: the record outlives the list
        address    TEXT NOT NULL,
        event      TEXT NOT NULL,       -- joined | left | changed | forgotten
        method     TEXT NOT NULL,       -- email | cli | import | bounce | web
        detail     TEXT NOT NULL DEFAULT '',
        at         REAL NOT NULL
    );
    CREATE INDEX consent_by_address ON consent_events(address);
    CREATE TABLE autoreplies (
        id       INTEGER PRIMARY KEY,
        address  TEXT NOT NULL,
        list_id  INTEGER NOT NULL,
        kind     TEXT NOT NULL,          -- confirm | reply | notice
        at       REAL NOT NULL
    );
    CREATE INDEX autoreplies_by_address ON autoreplies(address, at);
    CREATE TABLE accepted_senders (
        list_id     INTEGER NOT NULL,
        address     TEXT NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (list_id, address)
    );
    """,
    # 3 -> 4: what the archive derived from each message (thread, texts with
    # addresses hidden, its mbox entry), so an incremental update reads only
    # the rows of one thread and one month.  Rebuilt by `archive build --full`.
    """
    CREATE TABLE archive_meta (
        archive_id   INTEGER PRIMARY KEY,   -- archive.id
        list_id      INTEGER NOT NULL,
        msgid_hash   TEXT NOT NULL,
        message_id   TEXT NOT NULL,
        thread       TEXT NOT NULL,          -- Message-ID-Hash of the thread's topmost message
        parent       TEXT NOT NULL DEFAULT '',
        refs         TEXT NOT NULL DEFAULT '',  -- References, one per line
        date         REAL NOT NULL,
        month        TEXT NOT NULL,          -- YYYY-MM
        subject      TEXT NOT NULL,
        nsubject     TEXT NOT NULL,
        author       TEXT NOT NULL,
        snippet      TEXT NOT NULL,
        search       TEXT NOT NULL,
        attachments  INTEGER NOT NULL DEFAULT 0,
        mbox         BLOB NOT NULL
    );
    CREATE INDEX archive_meta_thread ON archive_meta(list_id, thread);
    CREATE INDEX archive_meta_month ON archive_meta(list_id, month, date);
    CREATE INDEX archive_meta_date ON archive_meta(list_id, date);
    CREATE INDEX archive_meta_msgid ON archive_meta(list_id, message_id);
    CREATE INDEX archive_meta_subject ON archive_meta(list_id, nsubject, date);
    CREATE TABLE archive_refs (
        list_id     INTEGER NOT NULL,
        ref         TEXT NOT NULL,
        archive_id  INTEGER NOT NULL
    );
    CREATE INDEX archive_refs_by_ref ON archive_refs(list_id, ref);
    CREATE INDEX archive_refs_by_id ON archive_refs(archive_id);
    CREATE TABLE archive_months (
        list_id  INTEGER NOT NULL,
        month    TEXT NOT NULL,
        count    INTEGER NOT NULL,
        PRIMARY KEY (list_id, month)
    ) WITHOUT ROWID;
    """,
    # 4 -> 5: bounces.  Every bounce read (or refusal at delivery) is an
    # event; only the member's own failures raise their score.
    """
    CREATE TABLE bounce_events (
        id          INTEGER PRIMARY KEY,
        list_id     INTEGER NOT NULL,
        address     TEXT NOT NULL,
        at          REAL NOT NULL,
        kind        TEXT NOT NULL,              -- permanent | temporary
        cause       TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT '',
        diagnostic  TEXT NOT NULL DEFAULT '',
        source      TEXT NOT NULL,              -- dsn | relay
        counted     INTEGER NOT NULL DEFAULT 0  -- 1: it raised the member's score
    );
    CREATE INDEX bounce_events_by_address ON bounce_events(list_id, address, at);
    ALTER TABLE members ADD COLUMN bounce_score REAL NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN bounce_scored_at REAL;
    ALTER TABLE members ADD COLUMN bounce_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE members ADD COLUMN disabled_at REAL;
    ALTER TABLE members ADD COLUMN warnings_sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN warned_at REAL;
    """,
    # 5 -> 6: the last errors of the stages, for `status` and `doctor`: what
    # leaves no row of its own (an archive update that failed, a stage that
    # failed as a whole).  One row per distinct error, counted.
    """
    CREATE TABLE stage_errors (
        id        INTEGER PRIMARY KEY,
        stage     TEXT NOT NULL,              -- prepare | deliver | requests | bounces | archive
        detail    TEXT NOT NULL,
        first_at  REAL NOT NULL,
        last_at   REAL NOT NULL,
        count     INTEGER NOT NULL DEFAULT 1,
        UNIQUE (stage, detail)
    );
    CREATE INDEX stage_errors_by_stage ON stage_errors(stage, last_at);
    """,
    # 6 -> 7: the store is the queue of every stage.  A worker claims rows with
    # a lease (lease_owner, lease_until); one that dies leaves the lease to
    # expire and another worker takes the row over.  Archive rows not yet
    # rendered are the archive stage's work (posts lost from the old in-memory
    # queue by a crash are picked up here).  stage_leases: the stages that run
    # in one worker at a time (the e-mail commands and bounces, the archive).
    """
    ALTER TABLE incoming ADD COLUMN lease_owner TEXT;
    ALTER TABLE incoming ADD COLUMN lease_until REAL;
    ALTER TABLE deliveries ADD COLUMN lease_owner TEXT;
    ALTER TABLE deliveries ADD COLUMN lease_until REAL;
    ALTER TABLE archive ADD COLUMN render_pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE archive ADD COLUMN lease_owner TEXT;
    ALTER TABLE archive ADD COLUMN lease_until REAL;
    UPDATE archive SET render_pending = 1 WHERE source = 'post' AND removed = 0
        AND id NOT IN (SELECT archive_id FROM archive_meta);
    CREATE INDEX archive_to_render ON archive(id) WHERE render_pending = 1;
    CREATE INDEX deliveries_by_lease ON deliveries(lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE TABLE stage_leases (
        stage        TEXT PRIMARY KEY,
        lease_owner  TEXT NOT NULL,
        lease_until  REAL NOT NULL
    );
    """,
    # 7 -> 8: the archive's own bookkeeping, for `listserv archive status`:
    # messages that could not be rendered (and why), and the last builds.
    """
    CREATE TABLE archive_failures (
        archive_id  INTEGER PRIMARY KEY,   -- archive.id
        list_id     INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        at          REAL NOT NULL
    );
    CREATE INDEX archive_failures_by_list ON archive_failures(list_id);
    CREATE TABLE archive_builds (
        list_id        INTEGER PRIMARY KEY,
        full_at        REAL,
        full_seconds   REAL,
        full_messages  INTEGER,
        updated_at     REAL
    );
    """,
    # 8 -> 9: how each member receives the list (issue 11).  delivery_mode
    # is kept apart from delivery (enabled | disabled | nomail), as Mailman
    # keeps delivery mode and delivery status apart.  language '' = the list's.
    # digest_posts: every post as an `each` member gets it (minus the
    # per-copy headers), waiting for its list's next digest; digests: one row
    # per digest sent (volume, issue), made in the transaction that queues
    # its copies, so a digest goes out once whatever crashes.
    """
    ALTER TABLE members ADD COLUMN delivery_mode TEXT NOT NULL DEFAULT 'each';
    ALTER TABLE members ADD COLUMN not_me INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN ack INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN no_dupes INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE members ADD COLUMN language TEXT NOT NULL DEFAULT '';
    CREATE TABLE digests (
        id          INTEGER PRIMARY KEY,
        list_id     INTEGER NOT NULL,
        volume      INTEGER NOT NULL,
        issue       INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        posts       INTEGER NOT NULL,
        reason      TEXT NOT NULL DEFAULT '',   -- period | size | manual
        UNIQUE (list_id, volume, issue)
    );
    CREATE TABLE digest_posts (
        id           INTEGER PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        incoming_id  INTEGER NOT NULL,
        message_id   TEXT NOT NULL,
        subject      TEXT NOT NULL,
        author       TEXT NOT NULL,      -- display name, else address
        sender       TEXT NOT NULL,      -- the author's address
        archived_at  TEXT NOT NULL DEFAULT '',
        size         INTEGER NOT NULL,
        added_at     REAL NOT NULL,
        digest_id    INTEGER,            -- NULL: waiting for the next digest
        data         BLOB NOT NULL,
        UNIQUE (list_id, incoming_id)
    );
    CREATE INDEX digest_posts_waiting ON digest_posts(list_id, id) WHERE digest_id IS NULL;
    CREATE INDEX digest_posts_by_digest ON digest_posts(digest_id);
    ALTER TABLE outbox ADD COLUMN digest_id INTEGER;
    """,
    # one_last_digest: a member who left a digest mode for `each` gets the
    # posts that waited for their digest in one last digest (as Mailman 3's
    # OneLastDigest), not silently nothing; the row goes with that digest.
    """
    CREATE TABLE one_last_digest (
        list_id        INTEGER NOT NULL,
        address        TEXT NOT NULL,
        delivery_mode  TEXT NOT NULL,      -- the digest mode they left
        PRIMARY KEY (list_id, address)
    );
    """,
    # A list's archive index (row id, Message-ID, hash, date) read from an
    # index alone, in row order: without it a full build looked each row up
    # in a table whose rows hold the whole message (0.05-0.19 s per 10,000,
    # against 0.01 s).
    """
    CREATE INDEX archive_by_list ON archive(list_id, id, removed, message_id, msgid_hash, received_at);
    """,
)
