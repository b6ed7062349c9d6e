"""The live mode: Ozon's push notifications in, every open order's state kept, re-scored as
things happen, alerts out (see the README's *Live mode*).

:mod:`live.push` (Ozon's endpoint) and :mod:`live.routes` (the seller's other records, the
scores) receive; :mod:`live.writer` commits to :mod:`live.book` (its tables in
:mod:`live.schema`, migrated by ``live/migrations``); :mod:`live.worker` re-scores with the one
scoring path and delivers :mod:`live.alerts`; :mod:`live.app` puts them in the service;
:mod:`live.archive` and :mod:`live.replay` go back and forth to a history directory.
"""
