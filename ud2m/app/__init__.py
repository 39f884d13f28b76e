"""The restoration web page (issue [app], docs/app.md): ``ud2m-app`` / ``python -m ud2m app``. :mod:`ud2m.app.jobs`
holds the pure functions (form values -> ``sample.py``'s job -> what the page shows); :mod:`ud2m.app.page` builds
the Gradio page and is the only module that imports gradio (the optional extra ``pip install -e ".[app]"``).
"""
