"""cifarcnn."""
