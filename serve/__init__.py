"""The Ray Serve application: schemas, embedding store, engine, scorer, the one deployment (HTTP ingress
and scorer in each replica), build_app; control (deploy/rollout/status/stop) and lifecycle (stop signals).

Importing the package starts nothing; ``serve.app``, ``serve.control`` and ``serve.lifecycle`` import Ray Serve.
"""
