$(PLUGIN): build/plugin_entry.py build/lazy_rthooks.py
