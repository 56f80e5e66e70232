"""extras/window.py: the two windows of track.py, with Tk from the standard library and Pillow's ImageTk: the
picker (`pick_box`), where the user draws the first box (`--select`, or an input without one), and the `Viewer`,
which shows each frame as it is tracked (`--show`). tkinter is imported only when a window opens: track.py runs
where Tk is missing, and without a display both give one line (BadInput) instead of a window.
"""
import time

from extras import media


PICK_TITLE, SHOW_TITLE = "pntrack: draw the box", "pntrack: tracking"    # window titles (the tests find them)


def open_window(title):
    """A Tk root window titled `title`, or None where none can open (no DISPLAY, no X server, no tkinter)."""
    try:
        import tkinter
    except ImportError:
        return None
    try:
        root = tkinter.Tk()
    except tkinter.TclError:                           # "no display name and no $DISPLAY", "couldn't connect"
        return None
    root.title(title)
    return root


def fit_to_screen(root, image):
    """(image scaled down, never up, so it fits the screen with a line of text below it; the scale)."""
    scale = min(1.0, 0.95 * root.winfo_screenwidth() / image.width, (root.winfo_screenheight() - 80) / image.height)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image, scale


def pick_box(first_frame, path):
    """The first box, drawn by the user on `first_frame` -> (x, y, w, h) in frame pixels, whole numbers.

    The frame is shown scaled down to fit the screen. A drag draws a rectangle (a new drag replaces it; a click
    without a drag is ignored), Enter or Space accepts it, Esc or closing the window cancels: BadInput, as when
    no window can open (the box must then come from --box).
    """
    root = open_window(PICK_TITLE)
    if root is None:
        raise media.BadInput(f"{path}: drawing the first box (--select) needs a display, and none can be opened "
                       f"(DISPLAY unset, or Tk cannot open it); give --box x,y,w,h")
    import tkinter
    from PIL import ImageTk
    shown, scale = fit_to_screen(root, first_frame)
    photo = ImageTk.PhotoImage(shown, master=root)
    canvas = tkinter.Canvas(root, width=shown.width, height=shown.height, highlightthickness=0, cursor="crosshair")
    canvas.create_image(0, 0, image=photo, anchor="nw")
    rect = canvas.create_rectangle(0, 0, 0, 0, outline="red", width=2, state="hidden")
    canvas.pack(anchor="nw")                    # at the window's top-left corner
    tkinter.Label(root, text="drag a box around the target; Enter or Space: track it, Esc: cancel",
                  wraplength=shown.width, justify="left", padx=0, bd=0).pack(anchor="w")   # window = picture wide
    start, drawn, chosen = [0, 0], [], []       # canvas px: where the drag began, the box on screen, the box taken

    def at(event):                              # the pointer, kept on the picture
        return min(max(event.x, 0), shown.width), min(max(event.y, 0), shown.height)

    def press(event):
        start[:] = at(event)

    def drag(event):
        (x0, y0), (x1, y1) = start, at(event)
        drawn[:] = [(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))]
        canvas.coords(rect, *drawn[0])
        canvas.itemconfigure(rect, state="normal")

    def accept(event):
        if drawn and drawn[0][0] < drawn[0][2] and drawn[0][1] < drawn[0][3]:   # a zero-size box: keep waiting
            chosen[:] = drawn
            root.quit()

    canvas.bind("<ButtonPress-1>", press)
    canvas.bind("<B1-Motion>", drag)
    for key in ("<Return>", "<KP_Enter>", "<space>"):
        root.bind(key, accept)
    root.bind("<Escape>", lambda event: root.quit())
    root.protocol("WM_DELETE_WINDOW", root.quit)
    root.mainloop()
    root.destroy()
    if not chosen:
        raise media.BadInput(f"{path}: no box drawn (Esc, or the window was closed); nothing tracked")
    x0, y0, x1, y1 = (round(v / scale) for v in chosen[0])
    return x0, y0, x1 - x0, y1 - y0


class Viewer:
    """--show: a window with each frame as it is tracked, its boxes drawn, the frame number and the running FPS.

    `show` returns True once the user asks to stop (q, Esc, or closing the window); Space pauses and goes on.
    Time spent here is the display's, not tracking's: run_tracker leaves it out of the end-to-end speed, and so
    does the running FPS shown.
    """
    def __init__(self, name, n):
        self.root = open_window(SHOW_TITLE)
        if self.root is None:
            raise media.BadInput("--show: no display to open a window on (DISPLAY unset, or Tk cannot open it); "
                           "--save FILE.mp4 writes the frames with the box instead")
        import tkinter
        self.name, self.of = name, f"/{n}" if n else ""
        self.picture = tkinter.Label(self.root)
        self.picture.pack()
        self.status = tkinter.Label(self.root, text="loading the network ...", anchor="w", font="TkFixedFont")
        self.status.pack(fill="x")
        for key in ("q", "<Escape>"):
            self.root.bind(key, self.stop)
        self.root.bind("<space>", self.pause)
        self.root.protocol("WM_DELETE_WINDOW", self.stop)
        self.stopped, self.paused = False, False
        self.start, self.outside = None, 0.0           # when frame 1 was shown; seconds spent in `show` since
        self.root.update()                             # the window opens while the network loads

    def stop(self, event=None):
        self.stopped = True

    def pause(self, event=None):
        self.paused = not self.paused

    def show(self, i, image):
        """Show frame i, its boxes drawn (None: it failed to decode, the last picture stays); True: stop."""
        from PIL import ImageTk
        t = time.perf_counter()
        self.start = self.start or t
        if image is not None:                          # kept in self: Tk shows the picture only while it lives
            self.photo = ImageTk.PhotoImage(fit_to_screen(self.root, image)[0], master=self.root)
            self.picture.configure(image=self.photo)
        fps = i / (t - self.start - self.outside) if i else 0.0
        self.status.configure(text=f"frame {i + 1}{self.of}   {fps:5.1f} FPS   Space: pause   q, Esc: stop")
        title = f"{SHOW_TITLE}: {self.name}, frame {i + 1}{self.of}"
        self.root.title(title)
        self.root.update()                             # draws, and handles the keys pressed since the last frame
        if self.paused:
            self.root.title(title + " (paused)")
        while self.paused and not self.stopped:
            self.root.update()
            time.sleep(0.02)
        self.outside += time.perf_counter() - t
        return self.stopped

    def close(self):
        self.root.destroy()
