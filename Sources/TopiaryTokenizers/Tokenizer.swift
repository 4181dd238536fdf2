public enum TopiaryTokenizersPlaceholder {}
