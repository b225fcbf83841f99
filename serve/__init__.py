"""The Ray Serve application: schemas, embedding store, scorer and ingress deployments, build_app.

Importing the package starts nothing; ``serve.app`` and ``serve.control`` import Ray Serve.
"""
