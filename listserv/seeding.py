"""The lists named in the config, created in the store before anything else runs (serve and every CLI command).

Kept apart from ``listserv.app`` so that a CLI command does not import the
whole server (SMTP, DKIM, HTTP: most of a second of start-up) to seed lists.
"""

from __future__ import annotations

import logging
from typing import Any

from listserv.config import Config
from listserv.errors import DuplicateError
from listserv.store import Store

__all__ = ["seed_lists"]

log = logging.getLogger("listserv.app")


async def seed_lists(store: Store, config: Config) -> None:
    """Create the lists named in the config that were never created before.

    A seeded list that the administrator removed stays removed.
    """
    existing = await store.list_names() | await store.seeded_names()
    for seed in config.lists:
        if seed.name in existing:
            continue
        settings: dict[str, Any] = {"language": seed.language}
        if seed.title:
            settings["title"] = seed.title
        if seed.description:
            settings["description"] = seed.description
        try:
            await store.create_list(seed.name, settings, seed.owners, seeded=True)
            log.info("created list %s from the config", seed.name)
        except DuplicateError:  # created by a CLI at the same moment
            pass
